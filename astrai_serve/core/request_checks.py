"""Checks a GenerateRequest and turns it into what the engine takes: token ids + SamplingParams.

Runs on the gRPC side, off the engine thread (tokenizing a long prompt there would stall every
running request). Every failure is an InvalidRequest naming the offending field, which the core
answers with INVALID_ARGUMENT; `code` is "context_length_exceeded" for prompts (or prompt +
max_tokens) that do not fit, as OpenAI reports it.

Chats render here with the model's chat template, tools, tool calls and tool results included
(as transformers' apply_chat_template takes them, so Qwen / Hermes templates read them as they
were written to). A template that would drop them — it never reads `tools`, or an assistant's
`tool_calls` — is an error naming the field, not a prompt silently without them. The output
constraints (SamplingParams.structured, a constraining tool_choice) are mapped in constraints.py.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from astrai_serve.core.constraints import InvalidRequest, structured_output
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import name_problem, schema_problem

CHAT_ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_PARSERS = ("auto", "hermes", "none")   # `astrai serve --tool-call-parser`
# Template variables a request's chat_template_kwargs may not set: the renderer's own.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                                         "continue_final_message", "bos_token", "eos_token", "pad_token"})
_OPTIONAL_PARAMS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "seed", "n", "skip_special_tokens",
                    "prompt_logprobs")


def _guess_param(message: str, names: list[str]) -> str:
    """SamplingParams names the bad field in its message; find which one, for the error's param."""
    hits = [n for n in names if f"{n}=" in message] or [n for n in names if n in message]
    return max(hits, key=len) if hits else "params"


def resolve_tool_call_parser(choice: str, tokenizer: Any) -> str:
    """--tool-call-parser -> the parser in force: "auto" is "hermes" when the chat template writes
    <tool_call> blocks (Qwen2.5/3, Hermes, astrai's default template), else none (""), so a model
    that cannot call tools is not offered them."""
    if choice not in TOOL_CALL_PARSERS:
        raise ValueError(f"--tool-call-parser {choice!r}: choose one of {', '.join(TOOL_CALL_PARSERS)}")
    if choice == "auto":
        features = getattr(tokenizer, "template_features", None)
        return "hermes" if features is not None and features.hermes_calls else ""
    return "" if choice == "none" else choice


class RequestChecker:
    def __init__(self, tokenizer: Any, max_len: int, vocab_size: int, tool_call_parser: str = "",
                 defaults: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        # The model's generation_config.json values (engine/generation_defaults.py) for the
        # sampling fields a request leaves unset, as vLLM applies them.
        self.defaults = dict(defaults or {})
        self.max_len = max_len        # longest prompt + completion the engine runs
        self.vocab_size = vocab_size  # token ids must be below this
        self.tool_call_parser = tool_call_parser  # "hermes" or "" (resolve_tool_call_parser)

    def messages(self, messages: pb.ChatMessages, field: str) -> list[dict[str, Any]]:
        """Proto messages -> the dicts a chat template reads (transformers' shapes: an assistant's
        tool_calls with their arguments parsed, as vLLM passes them; a tool message's tool_call_id)."""
        if not messages.messages:
            raise InvalidRequest(f"{field} must contain at least one message", field)
        out = []
        for i, m in enumerate(messages.messages):
            where = f"{field}[{i}]"
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"{where}.role is {m.role!r}; expected one of {', '.join(CHAT_ROLES)}",
                                     f"{where}.role")
            message: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.tool_calls:
                if m.role != "assistant":
                    raise InvalidRequest(f"{where} ({m.role}) has tool_calls; only assistant messages make tool calls",
                                         f"{where}.tool_calls")
                message["tool_calls"] = [self._tool_call(c, f"{where}.tool_calls[{j}]")
                                         for j, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                if not m.tool_call_id:
                    raise InvalidRequest(f"{where} (tool) needs the tool_call_id of the call it answers",
                                         f"{where}.tool_call_id")
                message["tool_call_id"] = m.tool_call_id
            elif m.tool_call_id:
                raise InvalidRequest(f"{where} ({m.role}) has a tool_call_id; only tool messages answer calls",
                                     f"{where}.tool_call_id")
            if m.name:
                message["name"] = m.name
            out.append(message)
        return out

    @staticmethod
    def _tool_call(call: pb.ToolCall, where: str) -> dict[str, Any]:
        problem = name_problem(call.name)
        if problem:
            raise InvalidRequest(f"{where}.function.name: {problem}", f"{where}.function.name")
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError) as err:
            raise InvalidRequest(f"{where}.function.arguments is not valid JSON: {err}",
                                 f"{where}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{where}.function.arguments must be a JSON object, got {call.arguments!r:.80}",
                                 f"{where}.function.arguments")
        return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}

    def tools(self, chat: pb.ChatMessages) -> list[dict[str, Any]] | None:
        """The tools as the template reads them: [{"type": "function", "function": {name,
        description?, parameters?}}]. None without tools."""
        if not chat.tools:
            return None
        if not self._features().tools:
            raise InvalidRequest("this model's chat template does not render tools (it never reads the `tools` "
                                 "variable), so they would be left out of the prompt; serve a model whose "
                                 "template supports tools (Qwen2.5/3, Hermes, astrai's default)", "tools")
        out, seen = [], set()
        for i, tool in enumerate(chat.tools):
            where = f"tools[{i}].function"
            problem = name_problem(tool.name) or (f"{tool.name!r} is defined twice" if tool.name in seen else None)
            if problem:
                raise InvalidRequest(f"{where}.name: {problem}", f"{where}.name")
            seen.add(tool.name)
            function: dict[str, Any] = {"name": tool.name}
            if tool.description:
                function["description"] = tool.description
            if tool.parameters:
                try:
                    parameters = json.loads(tool.parameters)
                except (json.JSONDecodeError, RecursionError) as err:
                    raise InvalidRequest(f"{where}.parameters is not valid JSON: {err}", f"{where}.parameters") from None
                problem = schema_problem(parameters)
                if problem:
                    raise InvalidRequest(f"{where}.parameters {problem}", f"{where}.parameters")
                function["parameters"] = parameters
            out.append({"type": "function", "function": function})
        return out

    def _features(self) -> Any:
        features = getattr(self.tokenizer, "template_features", None)
        if features is None:
            raise InvalidRequest("this model's tokenizer cannot render tools", "tools")
        return features

    @staticmethod
    def template_kwargs(chat: pb.ChatMessages) -> dict[str, Any]:
        if not chat.chat_template_kwargs:
            return {}
        param = "chat_template_kwargs"
        try:
            kwargs = json.loads(chat.chat_template_kwargs)
        except (json.JSONDecodeError, RecursionError) as err:
            raise InvalidRequest(f"{param} is not valid JSON: {err}", param) from None
        if not isinstance(kwargs, dict):
            raise InvalidRequest(f"{param} must be a JSON object of template variables", param)
        for key in kwargs:
            if not key.isidentifier() or key.startswith("_") or key in RESERVED_TEMPLATE_VARIABLES:
                why = "is set by the server itself" if key in RESERVED_TEMPLATE_VARIABLES else "is not a variable name"
                raise InvalidRequest(f"{param} may not set {key!r:.80}: it {why}", param)
        return kwargs

    def render_chat(self, chat: pb.ChatMessages, add_generation_prompt: bool | None, field: str,
                    tokenize: bool) -> Any:
        """A chat through the model's template: token ids (tokenize) or text. add_generation_prompt
        None: true, unless continue_final_message (which excludes it)."""
        messages = self.messages(chat, field)
        tools = self.tools(chat)
        if any("tool_calls" in m for m in messages) and not self._features().tool_calls:
            i = next(i for i, m in enumerate(messages) if "tool_calls" in m)
            raise InvalidRequest("this model's chat template does not render an assistant's tool_calls, so they "
                                 "would be left out of the prompt", f"{field}[{i}].tool_calls")
        kwargs = self.template_kwargs(chat)
        continue_final = chat.continue_final_message
        generation = (not continue_final) if add_generation_prompt is None else add_generation_prompt
        if continue_final and generation:
            raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be true: one continues "
                                 "the last message, the other opens a new assistant turn", "continue_final_message")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=tokenize,
                                                      tools=tools, continue_final_message=continue_final, **kwargs)
        except ValueError as exc:   # the template raised (raise_exception), or the message to continue is not there
            param = "continue_final_message" if "continue_final_message" in str(exc) else field
            raise InvalidRequest(str(exc), param) from None

    def token_ids(self, ids: Any, field: str) -> list[int]:
        """ids as a list, each checked to be in the vocabulary; the error names the first bad one."""
        ids = list(ids)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{field} contains {bad}, outside the vocabulary [0, {self.vocab_size})", field)
        return ids

    def tokenize(self, request: pb.TokenizeRequest) -> list[int]:
        """A Tokenize request's ids: text as is, or messages rendered with the chat template."""
        kind = request.WhichOneof("input")
        special = request.add_special_tokens if request.HasField("add_special_tokens") else kind == "text"
        if kind == "text":
            return self.tokenizer.encode(request.text, add_special_tokens=special)
        if kind == "messages":
            text = self.render_chat(request.messages, request.add_generation_prompt, kind, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=special)
        raise InvalidRequest("the request has no input: set text or messages", "input")

    def prompt_ids(self, request: pb.GenerateRequest) -> tuple[list[int], str]:
        """Tokenize the input the way the engine would. Returns (ids, name of the input field)."""
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidRequest("the request has no input: set one of text, messages or token_ids", "input")
        if kind == "text":
            if not request.text:
                raise InvalidRequest("text is empty", kind)
            ids = list(self.tokenizer.encode(request.text))
        elif kind == "messages":
            generation = request.add_generation_prompt if request.HasField("add_generation_prompt") else None
            ids = list(self.render_chat(request.messages, generation, kind, tokenize=True))
        else:
            ids = self.token_ids(request.token_ids.ids, kind)
        if not ids:
            raise InvalidRequest(f"the prompt ({kind}) is empty", kind)
        if len(ids) >= self.max_len:
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens but the model's context length is {self.max_len} tokens "
                f"(prompt + completion); shorten the prompt", kind, "context_length_exceeded")
        return ids, kind

    def sampling_params(self, p: pb.SamplingParams, prompt_len: int, input_field: str,
                        request: pb.GenerateRequest | None = None) -> Any:
        """Proto params -> the engine's SamplingParams. Unset max_tokens: up to the context's end.
        With the request, its output constraint too (SamplingParams.structured)."""
        from astrai_serve import SamplingParams  # the engine package (torch): imported only when serving

        kwargs: dict[str, Any] = {name: getattr(p, name) for name in _OPTIONAL_PARAMS if p.HasField(name)}
        for name, value in self.defaults.items():
            if name != "max_tokens":          # (that one is bounded by the room left, below)
                kwargs.setdefault(name, value)
        if request is not None:
            structured = structured_output(request, self.tool_call_parser)
            if structured is not None:
                kwargs["structured"] = structured
            if self._keeps_tool_tags(request) and not p.HasField("skip_special_tokens"):
                kwargs["skip_special_tokens"] = False
        if p.stop:
            kwargs["stop"] = list(p.stop)
        if p.stop_token_ids:
            kwargs["stop_token_ids"] = list(p.stop_token_ids)
        if p.ignore_eos:
            kwargs["ignore_eos"] = True
        if p.logprobs or p.top_logprobs:
            kwargs["logprobs"] = p.logprobs
            kwargs["top_logprobs"] = p.top_logprobs
        if p.logit_bias:
            bad = next((t for t in p.logit_bias if t >= self.vocab_size), None)
            if bad is not None:   # negative ids and bad biases: SamplingParams names them below
                raise InvalidRequest(f"logit_bias has token id {bad}, outside the vocabulary "
                                     f"[0, {self.vocab_size})", "logit_bias")
            kwargs["logit_bias"] = dict(p.logit_bias)
        room = self.max_len - prompt_len
        max_tokens = kwargs.setdefault("max_tokens", min(room, self.defaults.get("max_tokens", room)))
        if max_tokens > room:
            raise InvalidRequest(
                f"the model's context length is {self.max_len} tokens, but {prompt_len + max_tokens} were "
                f"requested ({prompt_len} in the prompt, max_tokens={max_tokens} for the completion); "
                f"reduce the prompt or max_tokens", input_field, "context_length_exceeded")
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            names = [f.name for f in dataclasses.fields(SamplingParams)]
            raise InvalidRequest(str(exc), _guess_param(str(exc), names)) from exc

    def _keeps_tool_tags(self, request: pb.GenerateRequest) -> bool:
        """Whether the tool-call tags must stay in the text for the parser to see them: as vLLM's
        hermes parser, special-token output is kept when the tokenizer marks <tool_call> special."""
        if not self.tool_call_parser or request.WhichOneof("input") != "messages" or not request.messages.tools:
            return False
        if request.tool_choice.mode == "none":
            return False
        tag = self.tokenizer.token_to_id("<tool_call>") if hasattr(self.tokenizer, "token_to_id") else None
        return tag is not None and tag in getattr(self.tokenizer, "special_ids", ())
