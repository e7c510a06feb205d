"""OpenAI request bodies -> astrai.v1.GenerateRequest, with OpenAI's error shape for bad input.

Status codes: OpenAI answers every malformed request — invalid JSON, a missing field, a field of
the wrong type, a value out of range, an unrecognized argument, a prompt longer than the
context — with **400** `invalid_request_error`, so this facade does too rather than FastAPI's
default 422: OpenAI clients and SDKs expect 400 and read `error.param` to name the bad field.
Unknown model -> 404 `model_not_found`; wrong API key -> 401; body over the limit -> 413.

`model` may be omitted (the one served model is meant); naming another model is a 404.

Completions take `prompt` as OpenAI does: a string, an array of token ids, or a batch — an array of
strings or an array of token-id arrays (one kind per batch). A batch of k prompts becomes k
GenerateRequests (the core takes one prompt per call); prompt i's sample j is choice i * n + j.

Completions' `echo` returns the prompt before the completion, in `text` and, with `logprobs: N`, in
the logprobs (prompt tokens first, the first with a null log-prob; the core scores the prompt
with prompt_logprobs = N), and `max_tokens` may be 0 there: with echo + logprobs that is how
lm-evaluation-harness scores a continuation. Chat has no echo (nor has OpenAI's).

Chat takes tools, tool_choice, parallel_tool_calls and tool messages (chat.py), and both endpoints
take an output constraint: response_format, structured_outputs or guided_* (structured.py).

Extensions beyond OpenAI (as vLLM spells them): top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, skip_special_tokens, min_tokens, include_stop_str_in_output, request_id (the
response's id is "chatcmpl-<request_id>" / "cmpl-<request_id>", as vLLM makes it), priority (only 0:
the scheduler has no priorities, and vLLM too refuses others when priority scheduling is off), and
on chat chat_template_kwargs, add_generation_prompt and continue_final_message. Arguments OpenAI
has but this server cannot honour (suffix, audio, ...) are refused with 400 instead of being
silently ignored; so are unknown ones.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any

from astrai_serve.facade import chat as chat_input
from astrai_serve.facade.errors import ApiError, bad as _bad, get_bool as _get_bool, type_name as _type_name
from astrai_serve.facade.structured import FIELDS as STRUCTURED_FIELDS, output_constraint
from astrai_serve.proto import generate_pb2 as pb


@dataclass(frozen=True)
class ParsedRequest:
    kind: str                    # "chat" | "completion"
    id: str                      # the response's id
    requests: tuple[pb.GenerateRequest, ...]  # what goes to the core: one per prompt, the same params
    stream: bool
    include_usage: bool          # stream_options.include_usage
    n: int
    logprobs: bool
    top_logprobs: int
    input_param: str             # "messages" | "prompt": the field an over-long prompt is blamed on
    echo: bool = False           # completions: the prompt comes first in each choice's text (and logprobs)
    # with echo, per prompt: its text as the client sent it, or None for token ids (the core decodes them)
    echo_texts: tuple[str | None, ...] = ()
    tool_parser: str = ""        # chat with tools (tool_choice not "none"): how to read calls from the text ("hermes")
    named_tool: bool = False     # tool_choice named a function: finish_reason stays "stop", as OpenAI's does
    structured_param: str | None = None  # the body field of the output constraint (for the core's errors about it)

    @property
    def num_choices(self) -> int:
        return len(self.requests) * self.n


MAX_N = 128
# A batch runs its prompts side by side in the engine, each with its n samples: bound both the
# prompts and the choices (sequences) one request may add.
MAX_PROMPTS = 128
MAX_CHOICES = 8 * MAX_N
MAX_STOP = 16
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS_TOKENS = 300  # entries per request, as OpenAI caps it
# Accepted and ignored: they change nothing about the generated text.
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
# Accepted only with their default (neutral) value.
NEUTRAL = {"functions": (None, []), "function_call": (None, "none", "auto"),
           "modalities": (None, ["text"]), "audio": (None,),
           "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "prediction": (None,),
           "reasoning_effort": (None,), "web_search_options": (None,)}
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
          "presence_penalty", "frequency_penalty", "logprobs", "logit_bias",
          "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids", "skip_special_tokens",
          "min_tokens", "include_stop_str_in_output", "request_id", "priority", *STRUCTURED_FIELDS}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                        "parallel_tool_calls", *chat_input.TEMPLATE_FIELDS}
COMPLETION_FIELDS = COMMON | {"prompt", "echo"}   # chat keeps echo NEUTRAL: it has none
MAX_REQUEST_ID = 256


def _get_int(body: dict, name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 is a fine integer in JSON
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, got {_type_name(value)} {value!r}")
    if not lo <= value <= hi:
        raise _bad(name, f"'{name}' must be between {lo} and {hi}, got {value}")
    return value


def _get_float(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number, got {_type_name(value)} {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise _bad(name, f"'{name}' must be in {lo_s}, {hi}], got {value}")
    return float(value)


def _get_stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"'stop' must be a string or an array of strings, got {_type_name(value)}")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' may hold at most {MAX_STOP} sequences, got {len(stops)}")
    if any(s == "" for s in stops):
        raise _bad("stop", "'stop' sequences must not be empty strings")
    return stops


def _token_id_list(value: Any, param: str) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(t < 0 for t in value):
            raise _bad(param, f"'{param}' token ids must be non-negative")
        return value
    return None


def _get_logit_bias(body: dict) -> dict[int, float]:
    """{"<token id>": bias} -> {id: bias}. Ids past the vocabulary are the core's to refuse (it knows
    the vocabulary); the error still names logit_bias."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("logit_bias", f"'logit_bias' must be an object of token id -> bias, got {_type_name(value)}")
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise _bad("logit_bias", f"'logit_bias' may hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(value)}")
    out = {}
    for key, bias in value.items():
        # JSON keys are strings; isdecimal + the int32 bound keep "-1", "1.5", " 7" and huge ids out
        if not key.isdecimal() or int(key) > 2**31 - 1:
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids (integers in [0, 2**31) as strings), "
                                     f"got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"'logit_bias' values must be numbers in [-100, 100], got {bias!r} "
                                     f"for token {key}")
        out[int(key)] = float(bias)
    return out


def _prompt_element(value: Any, param: str) -> str | list[int]:
    if isinstance(value, str):
        if not value:
            raise _bad(param, f"'{param}' must not be empty")
        return value
    if isinstance(value, list) and not value:
        raise _bad(param, f"'{param}' must not be empty")
    ids = _token_id_list(value, param)
    if ids is None:
        raise _bad(param, f"'{param}' must be a string or an array of token ids, got {_type_name(value)}")
    return ids


def _prompts(body: dict) -> list[str | list[int]]:
    """'prompt' -> one or more prompts, each a string or a list of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("prompt", "'prompt' is required")
    if isinstance(prompt, str) or _token_id_list(prompt, "prompt") is not None:
        return [_prompt_element(prompt, "prompt")]
    if not isinstance(prompt, list) or not all(isinstance(p, (str, list)) for p in prompt):
        raise _bad("prompt", "'prompt' must be a string, an array of strings, an array of token ids or an array "
                             f"of token-id arrays, got {_type_name(prompt)}")
    if not prompt:
        raise _bad("prompt", "'prompt' must not be empty")
    if len(prompt) > MAX_PROMPTS:
        raise _bad("prompt", f"'prompt' may hold at most {MAX_PROMPTS} prompts, got {len(prompt)}")
    if len({type(p) for p in prompt}) > 1:  # as OpenAI: one kind of prompt per batch
        raise _bad("prompt", "'prompt' must be an array of strings or an array of token-id arrays, not a mix")
    return [_prompt_element(p, f"prompt[{i}]" if len(prompt) > 1 else "prompt") for i, p in enumerate(prompt)]


def check_model(body: dict, model_name: str) -> None:
    """`model` may be omitted (the one served model is meant); naming another one is a 404."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"'model' must be a string, got {_type_name(model)}")
    if model is not None and model != model_name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_name}'",
                       param="model", code="model_not_found")


def _request_id(body: dict, kind: str) -> str:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    given = body.get("request_id")
    if given is None:
        return f"{prefix}-{uuid.uuid4().hex}"
    if not isinstance(given, str) or not given or len(given) > MAX_REQUEST_ID or not given.isprintable():
        raise _bad("request_id", f"'request_id' must be a non-empty printable string of at most {MAX_REQUEST_ID} "
                                 f"characters, got {given!r:.80}")
    return f"{prefix}-{given}"


def _chat(body: dict, request: pb.GenerateRequest, tool_call_parser: str) -> chat_input.ToolChoice:
    """messages, tools, tool_choice and the template options into `request`."""
    chat = chat_input.messages(body)
    tools = chat_input.tools(body)
    chat.tools.extend(tools)
    choice = chat_input.tool_choice(body, [t.name for t in tools], tool_call_parser)
    generation = chat_input.template_options(body, chat)
    request.messages.CopyFrom(chat)
    if generation is not None:
        request.add_generation_prompt = generation
    request.tool_choice.mode, request.tool_choice.function_name = choice.mode, choice.function
    parallel = _get_bool(body, "parallel_tool_calls")
    if parallel is not None:
        request.parallel_tool_calls = parallel
    return choice


def parse_request(kind: str, body: Any, model_name: str, context_length: int,
                  tool_call_parser: str = "") -> ParsedRequest:
    """Validate an OpenAI chat ("chat") or completions ("completion") body. Raises ApiError.
    tool_call_parser: the core's (ModelInfoResponse.tool_call_parser); "" = no tool calling."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_type_name(body)}")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for key, value in body.items():
        if key in allowed or key in IGNORED:
            continue
        if key in NEUTRAL:
            if value not in NEUTRAL[key]:
                raise _bad(key, f"'{key}' is not supported by this server")
            continue
        raise _bad(key, f"Unrecognized request argument supplied: {key}")
    check_model(body, model_name)
    stream = bool(_get_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("stream_options", "'stream_options' must be an object like {\"include_usage\": true}")
        include_usage = bool(_get_bool(options, "include_usage"))

    request_id = _request_id(body, kind)
    priority = _get_int(body, "priority", -(2**31), 2**31 - 1)
    if priority:
        raise _bad("priority", f"'priority' {priority} cannot be honoured: this server's scheduler has no priorities "
                               "(as vLLM without priority scheduling); send 0 or leave it out")
    request = pb.GenerateRequest(request_id=request_id)
    p = request.params
    prompts: list[str | list[int]] = []
    echo = False
    choice = chat_input.ToolChoice("none")
    if kind == "chat":
        choice = _chat(body, request, tool_call_parser)
        max_tokens = _get_int(body, "max_completion_tokens", 1, context_length)
        if max_tokens is None:
            max_tokens = _get_int(body, "max_tokens", 1, context_length)
        logprobs = bool(_get_bool(body, "logprobs"))
        top_logprobs = _get_int(body, "top_logprobs", 0, 20) or 0
        if top_logprobs and not logprobs:
            raise _bad("top_logprobs", "'top_logprobs' requires 'logprobs' to be true")
    else:
        prompts = _prompts(body)
        max_tokens = _get_int(body, "max_tokens", 0, context_length)   # 0: echo only (scoring)
        n_logprobs = _get_int(body, "logprobs", 0, 5)
        logprobs, top_logprobs = n_logprobs is not None, n_logprobs or 0
        echo = bool(_get_bool(body, "echo"))
        if echo and logprobs:   # the prompt's tokens, scored, come before the completion's
            p.prompt_logprobs = top_logprobs
    if max_tokens is not None:
        p.max_tokens = max_tokens
    elif kind == "completion":
        p.max_tokens = min(16, context_length)  # OpenAI's completions default; chat runs to the context's end
    min_tokens = _get_int(body, "min_tokens", 0, context_length)
    if min_tokens is not None:
        if p.HasField("max_tokens") and min_tokens > p.max_tokens:
            default = ", its default" if max_tokens is None else ""
            raise _bad("min_tokens", f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({p.max_tokens}{default})")
        p.min_tokens = min_tokens
    n = _get_int(body, "n", 1, MAX_N) or 1
    if len(prompts) * n > MAX_CHOICES:
        raise _bad("n", f"{len(prompts)} prompts with n = {n} make {len(prompts) * n} choices; "
                        f"the limit is {MAX_CHOICES} per request")
    p.n = n
    for name, lo, hi, lo_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                  ("presence_penalty", -2.0, 2.0, False), ("frequency_penalty", -2.0, 2.0, False),
                                  ("min_p", 0.0, 1.0, False), ("repetition_penalty", 0.0, 10.0, True)):
        value = _get_float(body, name, lo, hi, lo_open)
        if value is not None:
            setattr(p, name, value)
    top_k = _get_int(body, "top_k", -1, 1 << 30)
    if top_k is not None:
        p.top_k = top_k
    seed = _get_int(body, "seed", 0, MAX_SEED)
    if seed is not None:
        p.seed = seed
    p.stop.extend(_get_stop(body))
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if stop_ids != [] and _token_id_list(stop_ids, "stop_token_ids") is None:
            raise _bad("stop_token_ids", "'stop_token_ids' must be an array of token ids")
        p.stop_token_ids.extend(stop_ids)
    p.logit_bias.update(_get_logit_bias(body))
    p.ignore_eos = bool(_get_bool(body, "ignore_eos"))
    skip = _get_bool(body, "skip_special_tokens")
    if skip is not None:
        p.skip_special_tokens = skip
    p.logprobs, p.top_logprobs = logprobs, top_logprobs
    p.include_stop_str_in_output = bool(_get_bool(body, "include_stop_str_in_output"))
    structured, structured_param = output_constraint(body)
    if structured is not None:
        if choice.constrains:
            raise _bad("tool_choice", f"'tool_choice' {choice.mode!r} constrains the output to tool calls, and "
                                      f"'{structured_param}' constrains it too: set only one")
        p.structured.CopyFrom(structured)
    requests = [request] if kind == "chat" else []
    for i, prompt in enumerate(prompts):
        one = pb.GenerateRequest()
        one.CopyFrom(request)
        if len(prompts) > 1:
            one.request_id = f"{request_id}-{i}"  # the engine wants its request ids unique
        if isinstance(prompt, str):
            one.text = prompt
        else:
            one.token_ids.ids.extend(prompt)
            one.echo_prompt = echo   # only the core can turn the ids into text
        requests.append(one)
    return ParsedRequest(kind=kind, id=request_id, requests=tuple(requests), stream=stream,
                         include_usage=include_usage, n=n, logprobs=logprobs, top_logprobs=top_logprobs,
                         input_param="messages" if kind == "chat" else "prompt", echo=echo,
                         echo_texts=tuple(q if isinstance(q, str) else None for q in prompts) if echo else (),
                         tool_parser=tool_call_parser if choice.mode != "none" else "",
                         named_tool=choice.mode == "function",
                         structured_param="tool_choice" if choice.constrains else structured_param)
