"""Anthropic Messages request bodies -> astrai.v1.GenerateRequest (chat), with checks that name the
bad field. The mapping and what is refused: see messages_api.py."""
from __future__ import annotations

import json
import uuid
from typing import Any

from astrai_serve.facade import chat as chat_input
from astrai_serve.facade.errors import ApiError, bad, get_bool, get_str, type_name
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import name_problem, schema_problem

FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p", "top_k",
          "stream", "tools", "tool_choice"}
# Accepted and ignored: they change nothing about the generated text here.
IGNORED = {"metadata", "service_tier", "cache_control", "inference_geo", "user_profile_id", "workspace_id"}
NEUTRAL = {"thinking": (None, {"type": "disabled"})}   # accepted only when they change nothing
MAX_STOP = 16


def _check_block_keys(block: dict, allowed: set[str], at: str) -> None:
    for key in block:
        if key not in allowed and key != "cache_control":
            raise bad(f"{at}.{key}", f"'{at}.{key}' is not supported by this server")


def _text_blocks(value: Any, at: str, what: str) -> str:
    """A string, or a list of text blocks -> their text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(at, f"'{at}' must be a string or an array of text blocks, got {type_name(value)}")
    texts = []
    for j, block in enumerate(value):
        where = f"{at}[{j}]"
        if not isinstance(block, dict) or block.get("type") != "text":
            kind = block.get("type") if isinstance(block, dict) else type_name(block)
            raise bad(where, f"'{where}' must be a text block ({what} takes text only; this model reads text), "
                             f"got {kind!r:.40}")
        texts.append(_text_block(block, where))
    return "".join(texts)


def _text_block(block: dict, at: str) -> str:
    _check_block_keys(block, {"type", "text", "citations"}, at)
    return get_str(block, "text", f"{at}.text", required=True) or ""


def _content(m: dict, i: int) -> str | list:
    """A message's content: a string or a list of blocks, else a 400 naming it."""
    content = m.get("content")
    if not isinstance(content, (str, list)):
        raise bad(f"messages[{i}].content", f"'messages[{i}].content' must be a string or an array of content "
                                            f"blocks, got {type_name(content)}")
    return content


def _user(m: dict, i: int, out: pb.ChatMessages) -> None:
    content = _content(m, i)
    if isinstance(content, str):
        out.messages.add(role="user", content=content)
        return
    texts = []
    for j, block in enumerate(content):
        at = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_result":
            _check_block_keys(block, {"type", "tool_use_id", "content", "is_error"}, at)
            call_id = get_str(block, "tool_use_id", f"{at}.tool_use_id", required=True)
            get_bool(block, "is_error", f"{at}.is_error")
            result = block.get("content", "")
            out.messages.add(role="tool", tool_call_id=call_id,
                             content=_text_blocks(result, f"{at}.content", "a tool_result"))
        else:
            raise bad(at, f"'{at}' must be a text or tool_result block (this model reads text only), "
                          f"got {kind if kind is not None else type_name(block)!r:.40}")
    if texts or not content:
        out.messages.add(role="user", content="".join(texts))


def _assistant(m: dict, i: int, out: pb.ChatMessages) -> None:
    content = _content(m, i)
    if isinstance(content, str):
        out.messages.add(role="assistant", content=content)
        return
    message = out.messages.add(role="assistant")
    texts = []
    for j, block in enumerate(content):
        at = f"messages[{i}].content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_block(block, at))
        elif kind == "tool_use":
            _check_block_keys(block, {"type", "id", "name", "input"}, at)
            problem = name_problem(block.get("name"))
            if problem:
                raise bad(f"{at}.name", f"'{at}.name': {problem}")
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise bad(f"{at}.input", f"'{at}.input' must be an object, got {type_name(arguments)}")
            message.tool_calls.add(id=get_str(block, "id", f"{at}.id", required=True), name=block["name"],
                                   arguments=json.dumps(arguments, ensure_ascii=False))
        else:
            raise bad(at, f"'{at}' must be a text or tool_use block (this model writes text only), "
                          f"got {kind if kind is not None else type_name(block)!r:.40}")
    message.content = "".join(texts)


def _messages(body: dict) -> pb.ChatMessages:
    out = pb.ChatMessages()
    system = body.get("system")
    if system is not None:
        out.messages.add(role="system", content=_text_blocks(system, "system", "'system'"))
    value = body.get("messages")
    if value is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(value, list) or not value:
        raise bad("messages", f"'messages' must be a non-empty array, got {type_name(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object, got {type_name(m)}")
        for key in m:
            if key not in ("role", "content"):
                raise bad(f"messages[{i}].{key}", f"'messages[{i}].{key}' is not supported by this server")
        if "content" not in m:
            raise bad(f"messages[{i}].content", f"'messages[{i}].content' is required")
        role = m.get("role")
        if role == "user":
            _user(m, i, out)
        elif role == "assistant":
            _assistant(m, i, out)
        else:
            raise bad(f"messages[{i}].role", f"'messages[{i}].role' must be \"user\" or \"assistant\", got "
                                             f"{role!r:.40} (the system prompt goes in the top-level 'system')")
    return out


def _tools(body: dict) -> list[pb.Tool]:
    value = body.get("tools")
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > chat_input.MAX_TOOLS:
        raise bad("tools", f"'tools' must be an array of at most {chat_input.MAX_TOOLS} tools")
    out, seen = [], set()
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(at, f"'{at}' must be an object, got {type_name(tool)}")
        if tool.get("type", "custom") != "custom":
            raise bad(f"{at}.type", f"'{at}.type' {tool.get('type')!r:.40}: only client tools ({{name, "
                                    "description, input_schema}}) are supported; server tools are not")
        _check_block_keys(tool, {"type", "name", "description", "input_schema"}, at)
        name = tool.get("name")
        problem = name_problem(name) or (f"{name!r} is defined twice" if name in seen else None)
        if problem:
            raise bad(f"{at}.name", f"'{at}.name': {problem}")
        seen.add(name)
        schema = tool.get("input_schema")
        if schema is None:
            raise bad(f"{at}.input_schema", f"'{at}.input_schema' is required")
        problem = schema_problem(schema)
        if problem:
            raise bad(f"{at}.input_schema", f"'{at}.input_schema' {problem}")
        out.append(pb.Tool(name=name, description=get_str(tool, "description", f"{at}.description") or "",
                           parameters=json.dumps(schema, ensure_ascii=False)))
    return out


def _tool_choice(body: dict, names: list[str], parser: str) -> tuple[chat_input.ToolChoice, bool | None]:
    """Anthropic's tool_choice -> (the chat ToolChoice, parallel_tool_calls or None)."""
    value = body.get("tool_choice")
    if value is None:
        return chat_input.tool_choice({}, names, parser), None
    if not isinstance(value, dict) or value.get("type") not in ("auto", "any", "tool", "none"):
        raise bad("tool_choice", "'tool_choice' must be {\"type\": \"auto\" | \"any\" | \"tool\" | \"none\"}, "
                                 f"got {value!r:.80}")
    for key in value:
        if key not in ("type", "name", "disable_parallel_tool_use"):
            raise bad(f"tool_choice.{key}", f"'tool_choice.{key}' is not supported by this server")
    kind = value["type"]
    if kind == "tool":
        name = get_str(value, "name", "tool_choice.name", required=True)
        openai_choice: Any = {"type": "function", "function": {"name": name}}
    else:
        openai_choice = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if kind == "auto" and not names:
        openai_choice = "none"   # Anthropic allows auto without tools
    disable = get_bool(value, "disable_parallel_tool_use", "tool_choice.disable_parallel_tool_use")
    return chat_input.tool_choice({"tool_choice": openai_choice}, names, parser), \
        (not disable if disable is not None else None)


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise bad(name, f"'{name}' must be a number in [{lo}, {hi}], got {value!r:.40}")
    return float(value)


def _integer(body: dict, name: str, lo: int, hi: int, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise bad(name, f"'{name}' is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad(name, f"'{name}' must be an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


class MessagesRequest:
    """A checked Messages body: the GenerateRequest for the core and what the reply needs."""

    def __init__(self, body: Any, model: str, context_length: int, tool_call_parser: str):
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type_name(body)}")
        for key, value in body.items():
            if key in FIELDS or key in IGNORED:
                continue
            if key in NEUTRAL and value in NEUTRAL[key]:
                continue
            raise bad(key, f"'{key}' is not supported by this server" if key in NEUTRAL else
                      f"unrecognized request field: '{key}'")
        name = body.get("model")
        if name is not None and name != model:
            raise ApiError(404, f"model: '{name}' does not exist; this server serves '{model}'", param="model")
        self.model = model
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.stream = bool(get_bool(body, "stream"))
        chat = _messages(body)
        tools = _tools(body)
        chat.tools.extend(tools)
        choice, parallel = _tool_choice(body, [t.name for t in tools], tool_call_parser)
        self.tool_parser = tool_call_parser if choice.mode != "none" else ""
        request = pb.GenerateRequest(request_id=self.id, messages=chat)
        request.tool_choice.mode, request.tool_choice.function_name = choice.mode, choice.function
        if parallel is not None:
            request.parallel_tool_calls = parallel
        p = request.params
        p.max_tokens = _integer(body, "max_tokens", 1, context_length, required=True)
        for field, hi in (("temperature", 1.0), ("top_p", 1.0)):
            value = _number(body, field, 0.0, hi)
            if value is not None:
                setattr(p, field, value)
        top_k = _integer(body, "top_k", 0, 1 << 30)
        if top_k is not None:
            p.top_k = top_k
        stops = body.get("stop_sequences")
        if stops is not None:
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise bad("stop_sequences", "'stop_sequences' must be an array of non-empty strings")
            if len(stops) > MAX_STOP:
                raise bad("stop_sequences", f"'stop_sequences' may hold at most {MAX_STOP} strings, got {len(stops)}")
            p.stop.extend(stops)
            p.include_stop_str_in_output = True   # the matched one comes back: stop_sequence says which
        self.stops = sorted(p.stop, key=len, reverse=True)
        self.request = request

    def cut_stop(self, text: str) -> tuple[str, str | None]:
        """A sample's last text (finish "stop") -> (the text before the matched stop string, it)."""
        for s in self.stops:
            if text.endswith(s):
                return text[:len(text) - len(s)], s
        return text, None
