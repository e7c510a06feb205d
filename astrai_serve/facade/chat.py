"""OpenAI chat input -> the core's ChatMessages: messages (tool calls and tool results included),
tools, tool_choice, and vLLM's template options (chat_template_kwargs, add_generation_prompt,
continue_final_message). Used by /v1/chat/completions and /tokenize.

- Messages: roles system (developer is an alias), user, assistant, tool. An assistant message may
  carry `tool_calls` ([{id, type: "function", function: {name, arguments: JSON text}}]) with
  content null; a tool message needs `tool_call_id`. Content is text or text parts.
- tools: [{type: "function", function: {name, description?, parameters?: JSON Schema, strict?}}],
  names as OpenAI allows them (^[a-zA-Z0-9_-]{1,64}$, unique), parameters checked to be JSON
  Schema. Only function tools.
- tool_choice: "none" | "auto" (the default with tools) | "required" |
  {"type": "function", "function": {"name": one of the tools}}. As vLLM does, "none" keeps the
  tools in the prompt and only turns off parsing; "required" and a named function have the engine
  constrain the output to tool calls (see core/constraints.py).

How the template renders all this (and the errors for a template that cannot) is the core's part
(core/request_checks.py): the facade checks shapes, the core checks them again for gRPC clients.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from astrai_serve.facade.errors import ApiError, bad, get_bool, get_str, type_name
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import MAX_TOOLS, name_problem, schema_problem

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
TEMPLATE_FIELDS = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message")


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    role = message.get("role")
    if content is None and role == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content[{j}]",
                          f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}; "
                          "this model reads text only")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content",
              f"messages[{i}].content must be a string or an array of text parts, got {type_name(content)}")


def _arguments(value: Any, param: str) -> str:
    """A past call's arguments: JSON text of an object (as OpenAI sends them), or the object itself."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise bad(param, f"'{param}' must be a JSON object as a string, got {type_name(value)}")
    try:
        parsed = json.loads(value) if value.strip() else {}
    except (json.JSONDecodeError, RecursionError) as err:
        raise bad(param, f"'{param}' is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise bad(param, f"'{param}' must be a JSON object, got {type_name(parsed)}")
    return value


def _tool_calls(calls: Any, i: int, out: pb.ChatMessage) -> None:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise bad(where, f"'{where}' must be an array, got {type_name(calls)}")
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise bad(at, f"'{at}' must be an object, got {type_name(call)}")
        if call.get("type", "function") != "function":
            raise bad(f"{at}.type", f"'{at}.type' must be \"function\", got {call.get('type')!r:.40}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise bad(f"{at}.function", f"'{at}.function' must be an object with name and arguments")
        name = function.get("name")
        problem = name_problem(name)
        if problem:
            raise bad(f"{at}.function.name", f"'{at}.function.name': {problem}")
        call_id = get_str(call, "id", f"{at}.id") or ""
        out.tool_calls.add(id=call_id, name=name,
                           arguments=_arguments(function.get("arguments", "{}"), f"{at}.function.arguments"))


def messages(body: dict) -> pb.ChatMessages:
    value = body.get("messages")
    if value is None:
        raise bad("messages", "'messages' is required")
    if not isinstance(value, list):
        raise bad("messages", f"'messages' must be an array, got {type_name(value)}")
    if not value:
        raise bad("messages", "'messages' must contain at least one message")
    out = pb.ChatMessages()
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object, got {type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "tool" and m.get("content") is None:
            raise bad(f"messages[{i}].content", f"messages[{i}].content is required: a tool message carries its "
                                                "tool's result")
        message = out.messages.add(role=ROLES[role], content=_content(m, i))
        name = get_str(m, "name", f"messages[{i}].name")
        if name:
            message.name = name
        if role == "assistant" and m.get("tool_calls") is not None:
            _tool_calls(m["tool_calls"], i, message)
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise bad(f"messages[{i}].tool_call_id", f"messages[{i}] (tool) needs 'tool_call_id': the id of the "
                                                         "tool call it answers")
            message.tool_call_id = call_id
    return out


def tools(body: dict) -> list[pb.Tool]:
    value = body.get("tools")
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("tools", f"'tools' must be an array, got {type_name(value)}")
    if len(value) > MAX_TOOLS:
        raise bad("tools", f"'tools' may hold at most {MAX_TOOLS} tools, got {len(value)}")
    out, seen = [], set()
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad(at, f"'{at}' must be an object, got {type_name(tool)}")
        if tool.get("type") != "function":
            raise bad(f"{at}.type", f"'{at}.type' must be \"function\" (only function tools are supported), "
                                    f"got {tool.get('type')!r:.40}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad(f"{at}.function", f"'{at}.function' must be an object with at least a name")
        name = function.get("name")
        problem = name_problem(name) or (f"{name!r} is defined twice" if name in seen else None)
        if problem:
            raise bad(f"{at}.function.name", f"'{at}.function.name': {problem}")
        seen.add(name)
        description = get_str(function, "description", f"{at}.function.description") or ""
        get_bool(function, "strict", f"{at}.function.strict")
        parameters = function.get("parameters")
        if parameters is not None:
            problem = schema_problem(parameters)
            if problem:
                raise bad(f"{at}.function.parameters", f"'{at}.function.parameters' {problem}")
        out.append(pb.Tool(name=name, description=description,
                           parameters=json.dumps(parameters, ensure_ascii=False) if parameters is not None else ""))
    return out


@dataclass(frozen=True)
class ToolChoice:
    mode: str                # "none" | "auto" | "required" | "function"
    function: str = ""       # with "function": its name
    param: str = "tool_choice"

    @property
    def constrains(self) -> bool:
        return self.mode in ("required", "function")


def tool_choice(body: dict, names: list[str], tool_call_parser: str) -> ToolChoice:
    """tool_choice, checked against the tools and the server's tool-call parser."""
    value = body.get("tool_choice")
    if value is None:
        choice = ToolChoice("auto" if names else "none")
    elif value in ("none", "auto", "required"):
        choice = ToolChoice(value)
    elif isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise bad("tool_choice", "'tool_choice' naming a function must be "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if name not in names:
            raise bad("tool_choice", f"'tool_choice' names the function {name!r:.80}, which is not among 'tools' "
                                     f"({', '.join(names) or 'none given'})")
        choice = ToolChoice("function", name)
    elif isinstance(value, dict) and value.get("type") in ("allowed_tools", "custom"):
        raise bad("tool_choice", f"'tool_choice' of type {value['type']!r} is not supported: use \"none\", \"auto\", "
                                 "\"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}")
    else:
        raise bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                 f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {value!r:.80}")
    if choice.mode in ("required", "function") and not names:
        raise bad("tool_choice", f"'tool_choice' {choice.mode!r} needs 'tools': the request has none")
    if choice.mode != "none" and not tool_call_parser:
        param = "tool_choice" if value is not None else "tools"
        raise ApiError(400, f"tool calling (tool_choice {choice.mode!r}) needs a tool-call parser, and this server has "
                            "none: its model's chat template writes no <tool_call> blocks. Start `astrai serve` with "
                            "--tool-call-parser hermes if the model writes them, or send tool_choice \"none\"",
                       param=param)
    return choice


def template_options(body: dict, chat: pb.ChatMessages) -> bool | None:
    """chat_template_kwargs and continue_final_message into `chat`; returns add_generation_prompt
    (None: the default, true unless continue_final_message)."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise bad("chat_template_kwargs", "'chat_template_kwargs' must be an object of template variables, "
                                              f"e.g. {{\"enable_thinking\": false}}, got {type_name(kwargs)}")
        chat.chat_template_kwargs = json.dumps(kwargs, ensure_ascii=False)
    generation = get_bool(body, "add_generation_prompt")
    chat.continue_final_message = bool(get_bool(body, "continue_final_message"))
    if chat.continue_final_message and generation:
        raise bad("continue_final_message", "'continue_final_message' and 'add_generation_prompt' cannot both be "
                                            "true: one continues the last message, the other opens a new turn")
    return generation
