"""Anthropic's Messages API (`POST /v1/messages`) on the same gRPC GenerateRequest as chat.

A Messages body becomes a chat GenerateRequest: `system` (a string or text blocks) is the system
message; a user turn's `tool_result` blocks become tool messages (before the turn's text, in
order), an assistant turn's `tool_use` blocks its tool calls; `tools` ({name, description,
input_schema}) are the chat template's tools; tool_choice auto / any / tool / none maps onto
auto / required / a named function / none (`disable_parallel_tool_use` onto parallel_tool_calls).
max_tokens (required), stop_sequences, temperature (0-1, as Anthropic), top_p and top_k are the
sampling params (the anthropic SDK 2.x no longer has arguments for the last three: send them
in `extra_body`). `metadata`, `service_tier`, `inference_geo`, `user_profile_id`, `workspace_id`
and `cache_control` (top level and on blocks) are accepted and ignored (there is no prompt-cache
pricing here; the radix cache reuses prefixes anyway). Images,
documents, thinking, server tools, MCP servers and unknown fields are refused: 400 in Anthropic's
error shape {"type": "error", "error": {"type", "message"}}, the message naming the field.

The reply: text, then tool_use blocks (Hermes `<tool_call>` blocks parsed by tool_parser.py, ids
"toolu_..."); stop_reason end_turn | max_tokens | stop_sequence (stop_sequence set: the core is
asked to keep the matched stop string at the end of the last message, and it is cut off here) |
tool_use. Streams send Anthropic's events; the prompt's token count is known only at the end, so
message_start carries input_tokens 0 and message_delta the real count (the SDK takes it from
there, as it does for Anthropic's own streams).
"""
from __future__ import annotations

import hmac
import json
from typing import Any, AsyncIterator

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from astrai_serve.auth import bearer_matches
from astrai_serve.facade.disconnect import ClientGone, until_disconnect
from astrai_serve.facade.core_client import CoreClient, api_error
from astrai_serve.facade.errors import ApiError
from astrai_serve.facade.messages_protocol import MessagesRequest
from astrai_serve.facade.tool_parser import Arguments, CallStart, Content, HermesToolParser, parse_whole
from astrai_serve.proto import generate_pb2 as pb

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}
STOP_REASONS = {"length": "max_tokens", "stop": "end_turn"}


def error_response(err: ApiError) -> JSONResponse:
    kind = ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": err.message}}, status_code=err.status)


def check_auth(request: Request, api_key: str | None) -> None:
    """`x-api-key: KEY` (Anthropic's clients) or `Authorization: Bearer KEY`."""
    if not api_key:
        return
    given = request.headers.get("x-api-key")
    if given is not None and hmac.compare_digest(given.encode(), api_key.encode()):
        return
    if bearer_matches(request.headers.get("authorization"), api_key):
        return
    present = given is not None or "authorization" in request.headers
    raise ApiError(401, ("invalid x-api-key" if present else "missing API key") +
                   ": send 'x-api-key: <key>' (or 'Authorization: Bearer <key>')")



# ---- response --------------------------------------------------------------------------------
def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _usage(r: pb.GenerateResponse | None) -> dict[str, int]:
    u = r.usage if r is not None and r.HasField("usage") else pb.Usage()
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def _stop_reason(finish: str, called: bool, stop: str | None) -> str:
    if finish == "abort":
        raise ApiError(503, "the request was aborted: the server is shutting down")
    if stop is not None:
        return "stop_sequence"
    if called and finish == "stop":
        return "tool_use"
    return STOP_REASONS.get(finish, "end_turn")


def whole(parsed: MessagesRequest, responses: list[pb.GenerateResponse]) -> dict[str, Any]:
    text = "".join(r.text for r in responses)
    last = responses[-1] if responses else None
    finish = last.finish_reason if last is not None else "stop"
    stop = None
    if finish == "stop" and parsed.stops:
        text, stop = parsed.cut_stop(text)
    content: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    if parsed.tool_parser == "hermes":
        text, calls = parse_whole(text)
        text = text or ""
    if text:
        content.append({"type": "text", "text": text})
    for c in calls:
        content.append({"type": "tool_use", "id": _tool_id(c["id"]), "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"])})
    return {"id": parsed.id, "type": "message", "role": "assistant", "model": parsed.model, "content": content,
            "stop_reason": _stop_reason(finish, bool(calls), stop), "stop_sequence": stop, "usage": _usage(last)}


def _event(kind: str, data: dict[str, Any]) -> str:
    data = {"type": kind, **data}
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class StreamAssembler:
    """GenerateResponses -> Anthropic's stream events, one content block open at a time."""

    def __init__(self, parsed: MessagesRequest):
        self.parsed = parsed
        self.parser = HermesToolParser() if parsed.tool_parser == "hermes" else None
        self.index = -1          # the open block's index (-1: none yet)
        self.open: str | None = None   # "text" | "tool_use" | None

    def start(self) -> str:
        message = {"id": self.parsed.id, "type": "message", "role": "assistant", "model": self.parsed.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return _event("message_start", {"message": message})

    def _close(self, out: list[str]) -> None:
        if self.open is not None:
            out.append(_event("content_block_stop", {"index": self.index}))
            self.open = None

    def _text(self, text: str, out: list[str]) -> None:
        if not text:
            return
        if self.open != "text":
            self._close(out)
            self.index, self.open = self.index + 1, "text"
            out.append(_event("content_block_start", {"index": self.index,
                                                       "content_block": {"type": "text", "text": ""}}))
        out.append(_event("content_block_delta", {"index": self.index, "delta": {"type": "text_delta", "text": text}}))

    def events(self, r: pb.GenerateResponse) -> list[str]:
        out: list[str] = []
        text, stop = r.text, None
        if r.finish_reason == "stop" and self.parsed.stops:
            text, stop = self.parsed.cut_stop(text)
        if self.parser is None:
            self._text(text, out)
        else:
            events = self.parser.feed(text) if text else []
            if r.finish_reason:
                events += self.parser.finish()
            for e in events:
                if isinstance(e, Content):
                    self._text(e.text, out)
                elif isinstance(e, CallStart):
                    self._close(out)
                    self.index, self.open = self.index + 1, "tool_use"
                    block = {"type": "tool_use", "id": _tool_id(e.id), "name": e.name, "input": {}}
                    out.append(_event("content_block_start", {"index": self.index, "content_block": block}))
                elif isinstance(e, Arguments):
                    out.append(_event("content_block_delta", {
                        "index": self.index, "delta": {"type": "input_json_delta", "partial_json": e.text}}))
        if r.finish_reason:
            self._close(out)
            called = self.parser is not None and self.parser.called
            reason = _stop_reason(r.finish_reason, called, stop)
            out.append(_event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": stop},
                                                "usage": _usage(r)}))
            out.append(_event("message_stop", {}))
        return out


# ---- the route -------------------------------------------------------------------------------
async def _read_all(call: Any, first: Any) -> list[pb.GenerateResponse]:
    responses = []
    response = first
    while response is not grpc.aio.EOF:
        responses.append(response)
        response = await call.read()
    return responses


async def _or_disconnect(request: Request, work: Any) -> Any:
    """`work`'s result, or None when the client disconnects first (then work is cancelled)."""
    try:
        return await until_disconnect(request, work)
    except ClientGone:
        return None


async def messages_route(request: Request, core: CoreClient, read_json: Any, api_key: str | None) -> Response:
    """POST /v1/messages. Every error, from the auth check on, is in Anthropic's shape."""
    call = None
    streaming = False
    try:
        check_auth(request, api_key)
        body = await read_json(request)
        try:
            info = await core.model_info()
        except grpc.aio.AioRpcError as err:
            raise api_error(err) from None
        parsed = MessagesRequest(body, info.name, info.context_length, info.tool_call_parser)
        call = core.generate(parsed.request)
        try:
            first = await _or_disconnect(request, call.read())   # core errors are a 400 before any byte
            if first is None:
                return Response(status_code=499)
            if parsed.stream:
                streaming = True
                return StreamingResponse(_stream(parsed, call, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            responses = await _or_disconnect(request, _read_all(call, first))
            if responses is None:
                return Response(status_code=499)
        except grpc.aio.AioRpcError as err:
            error = api_error(err)
            if error.param == "messages" or error.param == "prompt":
                error.message = f"messages: {error.message}"
            raise error from None
        return JSONResponse(whole(parsed, responses))
    except ApiError as err:
        return error_response(err)
    finally:
        if call is not None and not streaming:
            call.cancel()


async def _stream(parsed: MessagesRequest, call: Any, first: Any) -> AsyncIterator[str]:
    assembler = StreamAssembler(parsed)
    try:
        yield assembler.start()
        response = first
        while response is not grpc.aio.EOF:
            for event in assembler.events(response):
                yield event
            response = await call.read()
    except (ApiError, grpc.aio.AioRpcError) as err:   # after the 200 went out, errors travel in the stream
        error = err if isinstance(err, ApiError) else api_error(err)
        kind = ERROR_TYPES.get(error.status, "api_error")
        yield _event("error", {"error": {"type": kind, "message": error.message}})
    finally:
        call.cancel()
