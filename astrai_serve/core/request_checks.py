"""Checks a GenerateRequest and turns it into what the engine takes: token ids + SamplingParams.

Runs on the gRPC side, off the engine thread (tokenizing a long prompt there would stall every
running request). Every failure is an InvalidRequest naming the offending field, which the core
answers with INVALID_ARGUMENT; `code` is "context_length_exceeded" for prompts (or prompt +
max_tokens) that do not fit, as OpenAI reports it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from astrai_serve.proto import generate_pb2 as pb

CHAT_ROLES = ("system", "user", "assistant")
_OPTIONAL_PARAMS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "seed", "n", "skip_special_tokens",
                    "prompt_logprobs")


class InvalidRequest(ValueError):
    """A client mistake: becomes INVALID_ARGUMENT naming `param`."""

    def __init__(self, message: str, param: str, code: str = ""):
        super().__init__(message)
        self.param = param
        self.code = code


def _guess_param(message: str, names: list[str]) -> str:
    """SamplingParams names the bad field in its message; find which one, for the error's param."""
    hits = [n for n in names if f"{n}=" in message] or [n for n in names if n in message]
    return max(hits, key=len) if hits else "params"


class RequestChecker:
    def __init__(self, tokenizer: Any, max_len: int, vocab_size: int):
        self.tokenizer = tokenizer
        self.max_len = max_len        # longest prompt + completion the engine runs
        self.vocab_size = vocab_size  # token ids must be below this

    def messages(self, messages: pb.ChatMessages, field: str) -> list[dict[str, str]]:
        if not messages.messages:
            raise InvalidRequest(f"{field} must contain at least one message", field)
        out = []
        for i, m in enumerate(messages.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequest(f"{field}[{i}].role is {m.role!r}; expected one of {', '.join(CHAT_ROLES)}", field)
            out.append({"role": m.role, "content": m.content})
        return out

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
            text = self.tokenizer.apply_chat_template(self.messages(request.messages, kind), tokenize=False,
                                                      add_generation_prompt=request.add_generation_prompt)
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
            ids = list(self.tokenizer.apply_chat_template(
                self.messages(request.messages, kind), add_generation_prompt=True, tokenize=True))
        else:
            ids = self.token_ids(request.token_ids.ids, kind)
        if not ids:
            raise InvalidRequest(f"the prompt ({kind}) is empty", kind)
        if len(ids) >= self.max_len:
            raise InvalidRequest(
                f"the prompt is {len(ids)} tokens but the model's context length is {self.max_len} tokens "
                f"(prompt + completion); shorten the prompt", kind, "context_length_exceeded")
        return ids, kind

    def sampling_params(self, p: pb.SamplingParams, prompt_len: int, input_field: str) -> Any:
        """Proto params -> the engine's SamplingParams. Unset max_tokens: up to the context's end."""
        from astrai_serve import SamplingParams  # the engine package (torch): imported only when serving

        kwargs: dict[str, Any] = {name: getattr(p, name) for name in _OPTIONAL_PARAMS if p.HasField(name)}
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
        max_tokens = kwargs.setdefault("max_tokens", room)
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
