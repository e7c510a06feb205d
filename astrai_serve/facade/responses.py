"""GenerateResponse messages -> OpenAI response JSON: whole responses and streaming chunks.

Mirrors OpenAI's shapes: a chat stream opens each choice with a `{"role": "assistant",
"content": ""}` delta and closes it with an empty delta carrying finish_reason; with
stream_options.include_usage every chunk has `"usage": null` and one last chunk with no
choices carries the usage.

Chat with tools (ParsedRequest.tool_parser): each choice's text goes through a tool-call parser
(tool_parser.py). A whole response has message.tool_calls ([{id, type: "function", function:
{name, arguments}}]) and the text outside the calls as content (null when none is left); a stream
sends them as OpenAI does: `delta.tool_calls` with the call's index, id, type and name in its
first chunk, then `function.arguments` fragments. finish_reason is "tool_calls" where the model
called a tool and stopped, except for a named tool_choice, where OpenAI keeps "stop".

A batch of prompts is one Assembler: the facade renumbers each response's index to the choice's
(prompt i's sample j is i * n + j), and the usage of all the prompts is summed.

Completions with echo, as OpenAI and vLLM shape them: a choice's first message (its first chunk,
when streamed) starts with the prompt's text, and with logprobs its logprobs list the prompt's
tokens first (the first token's log-prob and top_logprobs null: nothing precedes it), then the
generated ones; text_offset counts on through both. A long prompt's log-probs come from the core
in parts, several messages of the sample with nothing else in them before its first message with
tokens (or its finish): they are kept until that one, so the echo is still one piece.

Completions' top_logprobs, as OpenAI and vLLM fill them: a position's N most likely tokens and
also the token actually there when it is not one of them (OpenAI: "the API will always return
the logprob of the sampled token, so there may be up to logprobs+1 elements"), for generated and
echoed prompt tokens alike. Chat's top_logprobs list exactly the alternatives asked for: its
chosen token has its own fields.
"""
from __future__ import annotations

import time
from typing import Any

from astrai_serve.facade.protocol import ParsedRequest
from astrai_serve.facade.tool_parser import Arguments, CallStart, Content, Event, HermesToolParser, parse_whole
from astrai_serve.proto import generate_pb2 as pb


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _legacy_top(token_id: int, token: str, logprob: float, alternatives: Any) -> dict[str, float]:
    """A completions top_logprobs entry: the alternatives by text, and the chosen token if its id is
    not among them. Two ids can share a text: among the alternatives the later one's log-prob is
    kept, as a dict built in their order keeps it; the chosen token never replaces an alternative
    of its text (that one is at least as likely, since the chosen one is not among the top)."""
    top = {t.token: t.logprob for t in alternatives}
    if all(t.token_id != token_id for t in alternatives):
        top.setdefault(token, logprob)
    return top


class Assembler:
    """Accumulates one request's GenerateResponse streams; emits chunks or the whole response."""

    def __init__(self, parsed: ParsedRequest, model: str):
        self.parsed = parsed
        self.model = model
        self.id = parsed.id
        self.created = int(time.time())
        choices = range(parsed.num_choices)
        self.text: dict[int, list[str]] = {i: [] for i in choices}
        self.finish: dict[int, str | None] = {i: None for i in choices}
        self.chat_logprobs: dict[int, list[dict]] = {i: [] for i in choices}
        self.legacy_logprobs: dict[int, dict[str, list]] = {
            i: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for i in choices}
        self.offset: dict[int, int] = {i: 0 for i in choices}
        self.started: set[int] = set()
        self.echoed: set[int] = set()
        self.prompt_parts: dict[int, list[Any]] = {}   # choice -> PromptLogprobs of its parts so far
        self.usage: dict[str, Any] | None = None
        # choice -> its tool-call parser (streaming only; a whole response parses its text at the end)
        self.tool_parsers: dict[int, HermesToolParser] = (
            {i: HermesToolParser() for i in choices} if parsed.tool_parser == "hermes" and parsed.stream else {})

    # ---- shared ----------------------------------------------------------------------------
    def _absorb(self, r: pb.GenerateResponse) -> tuple[str, list[dict] | None, dict | None]:
        """Record r; return its text (after the echoed prompt, on a choice's first message with
        echo) and its logprobs in chat and legacy shapes (None when not requested)."""
        i = r.index
        echo = None
        if self.parsed.echo and i not in self.echoed:
            if r.prompt_logprobs and not r.token_ids and not r.finish_reason:   # a part: more follow
                self.prompt_parts.setdefault(i, []).extend(r.prompt_logprobs)
                return "", None, None
            echo = self._echo(r)
        text = r.text if echo is None else echo[0] + r.text
        self.text.setdefault(i, []).append(text)
        if r.finish_reason:
            self.finish[i] = r.finish_reason
        if r.HasField("usage"):  # once per Generate call, on its last message: a batch sums its calls'
            u, usage = r.usage, self.usage_or_empty()
            usage["prompt_tokens"] += u.prompt_tokens
            usage["completion_tokens"] += u.completion_tokens
            usage["total_tokens"] += u.prompt_tokens + u.completion_tokens
            usage["prompt_tokens_details"]["cached_tokens"] += u.cached_tokens
            self.usage = usage
        if not self.parsed.logprobs:
            return text, None, None
        chat = [{"token": lp.token, "logprob": lp.logprob, "bytes": _bytes(lp.token),
                 "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token)}
                                  for t in lp.top_logprobs[: self.parsed.top_logprobs]]}
                for lp in r.logprobs]
        legacy: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if echo is not None:
            legacy = echo[1]
        for lp in r.logprobs:
            legacy["tokens"].append(lp.token)
            legacy["token_logprobs"].append(lp.logprob)
            legacy["top_logprobs"].append(
                _legacy_top(lp.token_id, lp.token, lp.logprob, lp.top_logprobs[: self.parsed.top_logprobs]))
            legacy["text_offset"].append(self.offset.get(i, 0))
            self.offset[i] = self.offset.get(i, 0) + len(lp.token)
        self.chat_logprobs.setdefault(i, []).extend(chat)
        for key, values in legacy.items():
            self.legacy_logprobs.setdefault(i, {k: [] for k in legacy})[key].extend(values)
        return text, chat, legacy

    def _echo(self, r: pb.GenerateResponse) -> tuple[str, dict[str, list]]:
        """The prompt part of choice r.index: its text, and (with logprobs) its legacy logprobs."""
        i = r.index
        self.echoed.add(i)
        text = self.parsed.echo_texts[i // self.parsed.n]
        if text is None:   # a token-id prompt: the core decoded it
            text = r.prompt_text
        legacy: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if self.parsed.logprobs:
            offset, k = self.offset.get(i, 0), self.parsed.top_logprobs
            parts = self.prompt_parts.pop(i, [])
            for lp in (*parts, *r.prompt_logprobs) if parts else r.prompt_logprobs:
                scored = lp.HasField("logprob")   # not the first token: nothing precedes it
                legacy["tokens"].append(lp.token)
                legacy["token_logprobs"].append(lp.logprob if scored else None)
                legacy["top_logprobs"].append(
                    _legacy_top(lp.token_id, lp.token, lp.logprob, lp.top_logprobs[:k]) if scored else None)
                legacy["text_offset"].append(offset)
                offset += len(lp.token)
            self.offset[i] = offset
        return text, legacy

    def usage_or_empty(self) -> dict[str, Any]:
        return self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                              "prompt_tokens_details": {"cached_tokens": 0}}

    # ---- streaming -------------------------------------------------------------------------
    def _chunk(self, choices: list[dict]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.parsed.kind == "chat" else "text_completion"
        chunk: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                                 "choices": choices}
        # No system_fingerprint: the spec types it as a string, and there is no fingerprint to give.
        # usage: null on every chunk but the last is the chat stream's documented shape; a
        # completions chunk's usage is not nullable in the spec, so it is left out there.
        if self.parsed.include_usage and self.parsed.kind == "chat":
            chunk["usage"] = None
        return chunk

    def chunks(self, r: pb.GenerateResponse) -> list[dict[str, Any]]:
        text, chat_lp, legacy_lp = self._absorb(r)
        i, out = r.index, []
        if self.parsed.kind == "chat":
            if i not in self.started:
                self.started.add(i)
                out.append(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            lp = {"content": chat_lp, "refusal": None} if chat_lp is not None else None
            parser = self.tool_parsers.get(i)
            if parser is None:
                deltas = [{"content": r.text}] if r.text or chat_lp else []
            else:
                events = parser.feed(r.text) if r.text else []
                if r.finish_reason:
                    events += parser.finish()
                deltas = _deltas(events) or ([{}] if chat_lp else [])   # log-probs go out with something
            for k, delta in enumerate(deltas):
                out.append(self._chunk([{"index": i, "delta": delta, "logprobs": lp if k == 0 else None,
                                         "finish_reason": None}]))
            if r.finish_reason:
                called = parser is not None and parser.called
                out.append(self._chunk([{"index": i, "delta": {}, "logprobs": None,
                                         "finish_reason": self._finish_reason(r.finish_reason, called)}]))
        elif text or legacy_lp or r.finish_reason:
            out.append(self._chunk([{"index": i, "text": text, "logprobs": legacy_lp,
                                     "finish_reason": r.finish_reason or None}]))
        return out

    def _finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" and not self.parsed.named_tool else reason

    def usage_chunk(self) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = self.usage_or_empty()
        return chunk

    # ---- whole response --------------------------------------------------------------------
    def add(self, r: pb.GenerateResponse) -> None:
        self._absorb(r)

    def result(self) -> dict[str, Any]:
        choices = []
        for i in sorted(self.text):
            text = "".join(self.text[i])
            if self.parsed.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                finish = self.finish[i]
                if self.parsed.tool_parser == "hermes":
                    message["content"], calls = parse_whole(text)
                    if calls:
                        message["tool_calls"] = calls
                        finish = self._finish_reason(finish, True)
                choices.append({"index": i, "message": message,
                                "logprobs": ({"content": self.chat_logprobs[i], "refusal": None}
                                             if self.parsed.logprobs else None),
                                "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": self.legacy_logprobs[i] if self.parsed.logprobs else None,
                                "finish_reason": self.finish[i]})
        obj = "chat.completion" if self.parsed.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage_or_empty()}


def _deltas(events: list[Event]) -> list[dict[str, Any]]:
    """Tool-parser events -> chat deltas, one per event (a call's adjacent argument fragments
    joined), in OpenAI's streaming shape."""
    out: list[dict[str, Any]] = []
    for e in events:
        if isinstance(e, Content):
            out.append({"content": e.text})
        elif isinstance(e, CallStart):
            out.append({"tool_calls": [{"index": e.index, "id": e.id, "type": "function",
                                        "function": {"name": e.name, "arguments": ""}}]})
        elif isinstance(e, Arguments):
            last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
            if last is not None and last["index"] == e.index and "id" not in last:
                last["function"]["arguments"] += e.text
            else:
                out.append({"tool_calls": [{"index": e.index, "function": {"arguments": e.text}}]})
    return out
