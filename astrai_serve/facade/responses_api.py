"""OpenAI's Responses API, `POST /v1/responses`: a Responses body becomes a chat body (the same
checks and the same GenerateRequest as /v1/chat/completions), and the streamed GenerateResponses
become a Response object or its server-sent events.

Request fields:
- input: a string (one user message) or a list of items: messages {role user | assistant |
  system | developer, content: a string or input_text / output_text parts}, function_call items
  {call_id, name, arguments} (consecutive ones are one assistant turn) and function_call_output
  items {call_id, output} (a tool message). instructions: a system message before the input.
- max_output_tokens, temperature, top_p, stream, tools (function tools only: {type: "function",
  name, description?, parameters?, strict?}), tool_choice ("auto" | "none" | "required" |
  {type: "function", name}), parallel_tool_calls, text.format ({type: text | json_object |
  json_schema with name, schema, strict}: the constraint chat's response_format sets), metadata
  (echoed), user / safety_identifier / prompt_cache_key / service_tier (ignored), truncation
  "disabled", include [], store false, background false. Extras as on chat: top_k, min_p,
  repetition_penalty, seed, ignore_eos.
- Refused with a 400 naming the field: store true and previous_response_id (stored responses
  are not kept: send the whole conversation as `input`), reasoning (this model writes no
  reasoning items), conversation, prompt, background true, and every unknown field.

The response: id "resp_...", status completed, or incomplete with incomplete_details {reason:
"max_output_tokens"} when the output was cut at the token limit; output is a message item (its
text as one output_text part) and a function_call item per tool call the model made, in the
order they were written; usage in the Responses shape. A stream sends OpenAI's events, each as
`event: <type>` and `data: {...}` with a sequence_number: response.created, response.in_progress,
then per item output_item.added, (content_part.added, output_text.delta..., output_text.done,
content_part.done | function_call_arguments.delta..., function_call_arguments.done),
output_item.done, and last response.completed (or response.incomplete); no `[DONE]`.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, AsyncIterator

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from astrai_serve.facade.disconnect import ClientGone, until_disconnect
from astrai_serve.facade.core_client import api_error
from astrai_serve.facade.errors import ApiError, bad, get_str, type_name
from astrai_serve.facade.protocol import ParsedRequest, parse_request
from astrai_serve.facade.tool_parser import Arguments, CallStart, Content, HermesToolParser, parse_whole

PASSED = {"model", "temperature", "top_p", "stream", "parallel_tool_calls",
          "top_k", "min_p", "repetition_penalty", "seed", "ignore_eos"}   # the same meaning on chat
OWN = {"input", "instructions", "max_output_tokens", "tools", "tool_choice", "text", "metadata", "store",
       "previous_response_id", "reasoning", "truncation", "include", "background"}
IGNORED = {"user", "safety_identifier", "prompt_cache_key", "service_tier"}
REFUSED = {"conversation": "conversations are not kept by this server: send the whole conversation as 'input'",
           "prompt": "prompt templates are not supported: send 'input' (and 'instructions')"}
ROLES = ("user", "assistant", "system", "developer")
NOT_STORED = ("this server keeps no stored responses: send the whole conversation as 'input' (with the "
              "function_call and function_call_output items of earlier turns) and 'store': false")


def _hex() -> str:
    return uuid.uuid4().hex


# ---- request -------------------------------------------------------------------------------
def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(param, f"'{param}' must be a string or an array of text parts, got {type_name(content)}")
    texts = []
    for j, part in enumerate(content):
        at = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(part.get("text"), str):
            raise bad(at, f"'{at}' must be a text part {{'type': 'input_text', 'text': ...}}; "
                          "this model reads text only")
        texts.append(part["text"])
    return "".join(texts)


def _messages(body: dict) -> tuple[list[dict], list[str]]:
    """instructions + input -> chat messages, and for each the input field it came from."""
    messages: list[dict] = []
    where: list[str] = []
    instructions = get_str(body, "instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
        where.append("instructions")
    value = body.get("input")
    if value is None:
        raise bad("input", "'input' is required")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
        where.append("input")
        return messages, where
    if not isinstance(value, list):
        raise bad("input", f"'input' must be a string or an array of input items, got {type_name(value)}")
    if not value:
        raise bad("input", "'input' must hold at least one item")
    names: dict[str, str] = {}   # call_id -> the function's name
    for i, item in enumerate(value):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(at, f"'{at}' must be an object, got {type_name(item)}")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise bad(f"{at}.role", f"'{at}.role' must be one of {', '.join(ROLES)}, got {role!r:.40}")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{at}.content")})
            where.append(at)
        elif kind == "function_call":
            call_id = get_str(item, "call_id", f"{at}.call_id", required=True)
            name = get_str(item, "name", f"{at}.name", required=True)
            arguments = item.get("arguments", "{}")
            names[call_id] = name
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and where[-1].startswith("input["):
                last.setdefault("tool_calls", []).append(call)   # one turn: its text and its calls
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                where.append(at)
        elif kind == "function_call_output":
            call_id = get_str(item, "call_id", f"{at}.call_id", required=True)
            output = item.get("output")
            if output is None:
                raise bad(f"{at}.output", f"'{at}.output' is required: the tool's result")
            message = {"role": "tool", "tool_call_id": call_id, "content": _text_of(output, f"{at}.output")}
            if call_id in names:
                message["name"] = names[call_id]
            messages.append(message)
            where.append(at)
        elif kind == "item_reference":
            raise bad(f"{at}.type", f"'{at}': item references need stored responses; {NOT_STORED}")
        else:
            raise bad(f"{at}.type", f"'{at}.type' {kind!r:.40} is not supported: send message, function_call "
                                    "and function_call_output items")
    return messages, where


def _tools(body: dict) -> list[dict] | None:
    value = body.get("tools")
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad("tools", f"'tools' must be an array, got {type_name(value)}")
    out = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(at, f"'{at}' must be an object, got {type_name(tool)}")
        if tool.get("type") != "function":
            raise bad(f"{at}.type", f"'{at}.type' must be \"function\" (only function tools are supported), "
                                    f"got {tool.get('type')!r:.40}")
        unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if unknown:
            field = sorted(unknown)[0]
            raise bad(f"{at}.{field}", f"Unrecognized tool field supplied: {at}.{field}")
        out.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters",
                                                                         "strict") if tool.get(k) is not None}})
    return out


def _tool_choice(body: dict) -> Any:
    value = body.get("tool_choice")
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        if not isinstance(value.get("name"), str):
            raise bad("tool_choice", "'tool_choice' naming a function must be {\"type\": \"function\", \"name\": ...}")
        return {"type": "function", "function": {"name": value["name"]}}
    raise bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                             f"{{\"type\": \"function\", \"name\": ...}}, got {value!r:.80}")


def _response_format(body: dict) -> dict | None:
    text = body.get("text")
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad("text", "'text' must be an object like {\"format\": {\"type\": \"text\"}}, "
                          f"got {type_name(text)}")
    unknown = set(text) - {"format", "verbosity"}
    if unknown:
        raise bad(f"text.{sorted(unknown)[0]}", f"Unrecognized argument supplied: text.{sorted(unknown)[0]}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise bad("text.format", f"'text.format' must be an object, got {type_name(fmt)}")
    if fmt.get("type") != "json_schema":
        return {"type": fmt.get("type")}
    return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "description", "schema", "strict")
                                                   if k in fmt}}


def chat_body(body: Any) -> tuple[dict, list[str]]:
    """A Responses body -> (the equivalent chat completions body, the input field of each message)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type_name(body)}")
    for key in body:
        if key in REFUSED:
            if body[key] is not None:
                raise bad(key, f"'{key}' is not supported: {REFUSED[key]}")
        elif key not in PASSED and key not in OWN and key not in IGNORED:
            raise bad(key, f"Unrecognized request argument supplied: {key}")
    if body.get("store") is True:
        raise bad("store", f"'store': true is not supported: {NOT_STORED}")
    if body.get("store") not in (None, False):
        raise bad("store", f"'store' must be a boolean, got {type_name(body['store'])}")
    if body.get("previous_response_id") is not None:
        raise bad("previous_response_id", f"'previous_response_id' cannot be honoured: {NOT_STORED}")
    if body.get("reasoning") not in (None, {}):
        raise bad("reasoning", "'reasoning' is not supported: this model writes no reasoning items; leave it out")
    if body.get("background") not in (None, False):
        raise bad("background", "'background' responses are not supported: they would have to be stored")
    if body.get("truncation") not in (None, "disabled"):
        raise bad("truncation", "'truncation' must be \"disabled\": an input longer than the context is refused")
    if body.get("include") not in (None, []):
        raise bad("include", "'include' must be empty: there is nothing extra (no reasoning, no tool outputs) to add")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("metadata", "'metadata' must be an object of string keys and string values")
    messages, where = _messages(body)
    out: dict[str, Any] = {k: body[k] for k in PASSED if k in body}
    out["messages"] = messages
    if body.get("max_output_tokens") is not None:
        out["max_completion_tokens"] = body["max_output_tokens"]
    for key, value in (("tools", _tools(body)), ("tool_choice", _tool_choice(body)),
                       ("response_format", _response_format(body))):
        if value is not None:
            out[key] = value
    return out, where


_MESSAGE = re.compile(r"messages\[(\d+)\]")
_RENAMES = (("max_completion_tokens", "max_output_tokens"), ("response_format.json_schema", "text.format"),
            ("response_format", "text.format"), (".function.", "."), ("'function'", "'name'"))


def responses_error(error: ApiError, where: list[str]) -> ApiError:
    """An error about the chat body, in the Responses body's field names."""
    def rename(text: str) -> str:
        text = _MESSAGE.sub(lambda m: where[int(m.group(1))] if int(m.group(1)) < len(where) else m.group(0), text)
        for old, new in _RENAMES:
            text = text.replace(old, new)
        return text
    if error.param == "messages":
        error.param = "input"
    elif error.param:
        error.param = rename(error.param)
    error.message = rename(error.message)
    return error


def parse(body: Any, model_name: str, context_length: int, tool_call_parser: str
          ) -> tuple[ParsedRequest, list[str]]:
    """A Responses body -> (the chat request it is, the input field of each chat message)."""
    chat, where = chat_body(body)
    try:
        parsed = parse_request("chat", chat, model_name, context_length, tool_call_parser)
    except ApiError as err:
        raise responses_error(err, where) from None
    return parsed, where


# ---- response ------------------------------------------------------------------------------
class ResponseBuilder:
    """One response's output items, from GenerateResponses as they come: whole or as SSE events."""

    def __init__(self, parsed: ParsedRequest, body: dict, model: str):
        self.parsed, self.body, self.model = parsed, body, model
        self.id = f"resp_{_hex()}"
        self.created = int(time.time())
        self.text: list[str] = []
        self.finish = ""
        self.usage: dict[str, Any] = {"input_tokens": 0,
                                      "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                                      "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0},
                                      "total_tokens": 0}
        self.parser = HermesToolParser() if parsed.tool_parser == "hermes" else None
        self.output: list[dict] = []     # streaming: the items sent so far
        self.open: dict | None = None    # streaming: the item being written
        self.seq = 0

    def _absorb(self, r: Any) -> None:
        self.text.append(r.text)
        if r.finish_reason:
            self.finish = r.finish_reason
        if r.HasField("usage"):
            u = r.usage
            self.usage.update(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                              total_tokens=u.prompt_tokens + u.completion_tokens)
            # the prefix cache keeps every prompt token it did not already hold
            self.usage["input_tokens_details"] = {"cached_tokens": u.cached_tokens,
                                                  "cache_write_tokens": max(u.prompt_tokens - u.cached_tokens, 0)}

    @property
    def status(self) -> str:
        return "incomplete" if self.finish == "length" else "completed"

    def response(self, status: str, output: list[dict]) -> dict[str, Any]:
        b = self.body
        tools = [{"type": "function", "name": t["name"], "description": t.get("description"),
                  "parameters": t.get("parameters"), "strict": t.get("strict")}
                 for t in b.get("tools") or ()]
        done = status in ("completed", "incomplete")
        response = {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None, "background": False,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.get("instructions"), "max_output_tokens": b.get("max_output_tokens"),
            "model": self.model, "output": output, "parallel_tool_calls": b.get("parallel_tool_calls", True),
            "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": b.get("temperature", 1.0), "top_p": b.get("top_p", 1.0),
            "text": {"format": (b.get("text") or {}).get("format") or {"type": "text"}},
            "tool_choice": b.get("tool_choice", "auto"), "tools": tools, "truncation": "disabled",
            "metadata": b.get("metadata") or {},
        }
        if done:   # the spec has no null usage: in-progress snapshots leave it out
            response["usage"] = self.usage
        if b.get("user") is not None:
            response["user"] = b["user"]
        return response

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": f"msg_{_hex()}", "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

    @staticmethod
    def _call(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{_hex()}", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    # ---- whole -----------------------------------------------------------------------------
    def add(self, r: Any) -> None:
        self._absorb(r)

    def result(self) -> dict[str, Any]:
        text = "".join(self.text)
        status = self.status
        calls: list[dict] = []
        content: str | None = text
        if self.parser is not None:
            content, calls = parse_whole(text)
        output = [self._message(content, status)] if content or not calls else []
        output += [self._call(c["id"], c["function"]["name"], c["function"]["arguments"], "completed") for c in calls]
        return self.response(status, output)

    # ---- streamed --------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"

    def start(self) -> list[str]:
        return [self._event("response.created", response=self.response("in_progress", [])),
                self._event("response.in_progress", response=self.response("in_progress", []))]

    def _close(self, status: str) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = len(self.output)
        item["status"] = status
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                content_index=0, text=part["text"], logprobs=[]),
                    self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                content_index=0, part=part)]
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return out

    def _open(self, item: dict) -> list[str]:
        self.open = item
        index = len(self.output)
        out = [self._event("response.output_item.added", output_index=index, item=json.loads(json.dumps(item)))]
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part=dict(item["content"][0])))
        return out

    def events(self, r: Any) -> list[str]:
        self._absorb(r)
        events = (self.parser.feed(r.text) if r.text else []) if self.parser else (
            [Content(r.text)] if r.text else [])
        if r.finish_reason and self.parser:
            events += self.parser.finish()
        out: list[str] = []
        for e in events:
            index = len(self.output)
            if isinstance(e, Content):
                if self.open is None or self.open["type"] != "message":
                    out += self._close("completed")
                    out += self._open(self._message("", "in_progress"))
                    index = len(self.output)
                self.open["content"][0]["text"] += e.text
                out.append(self._event("response.output_text.delta", item_id=self.open["id"], output_index=index,
                                       content_index=0, delta=e.text, logprobs=[]))
            elif isinstance(e, CallStart):
                out += self._close("completed")
                out += self._open(self._call(e.id, e.name, "", "in_progress"))
            elif isinstance(e, Arguments) and self.open is not None and self.open["type"] == "function_call":
                self.open["arguments"] += e.text
                out.append(self._event("response.function_call_arguments.delta", item_id=self.open["id"],
                                       output_index=index, delta=e.text))
        if r.finish_reason:
            status = self.status
            if self.open is None and not self.output:   # nothing written: an empty message
                out += self._open(self._message("", "in_progress"))
            out += self._close("incomplete" if status == "incomplete" and (
                self.open or {}).get("type") == "message" else "completed")
            out.append(self._event(f"response.{status}", response=self.response(status, self.output)))
        return out

    def error_event(self, err: ApiError) -> str:
        return self._event("error", code=err.code, message=err.message, param=err.param)


# ---- the route -----------------------------------------------------------------------------
async def create(request: Request, body: Any, core: Any, info: Any) -> Response:
    """POST /v1/responses (auth checked and the body read by the caller)."""
    parsed, where = parse(body, info.name, info.context_length, info.tool_call_parser)
    builder = ResponseBuilder(parsed, body, info.name)
    call = core.generate(parsed.requests[0])

    async def read() -> Any:
        try:
            return await call.read()
        except grpc.aio.AioRpcError as err:
            raise responses_error(_structured_param(api_error(err), parsed), where) from None

    streaming = False
    try:
        first = await _race(request, read())
        if first is None:
            return Response(status_code=499)
        if parsed.stream:
            streaming = True
            return StreamingResponse(_stream(builder, call, first, read), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> bool:
            r = first
            while r is not grpc.aio.EOF:
                builder.add(r)
                r = await read()
            return True

        if await _race(request, collect()) is None:
            return Response(status_code=499)
        return JSONResponse(builder.result())
    finally:
        if not streaming:
            call.cancel()


def _structured_param(error: ApiError, parsed: ParsedRequest) -> ApiError:
    if error.param and error.param.split(".")[0] == "structured" and parsed.structured_param:
        error.param = parsed.structured_param
    return error


async def _race(request: Request, awaitable: Any) -> Any:
    """The awaitable's result, or None when the client disconnects first."""
    try:
        return await until_disconnect(request, awaitable)
    except ClientGone:
        return None


async def _stream(builder: ResponseBuilder, call: Any, first: Any, read: Any) -> AsyncIterator[str]:
    try:
        for event in builder.start():
            yield event
        r = first
        while r is not grpc.aio.EOF:
            for event in builder.events(r):
                yield event
            r = await read()
    except ApiError as err:   # after the 200 went out, errors travel in the stream
        yield builder.error_event(err)
    finally:
        call.cancel()
