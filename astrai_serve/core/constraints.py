"""A GenerateRequest's output constraint -> the engine's StructuredOutput (SamplingParams.structured).

Two sources, at most one per request:
- params.structured: a JSON Schema, any JSON object, a regex, a choice of strings or a Lark
  grammar (the REST facade maps OpenAI's response_format and vLLM's structured_outputs /
  guided_* onto it; gRPC clients set it directly);
- tool_choice "required" or a named function, with messages.tools: the output is one or more tool
  calls (one, with parallel_tool_calls false) in the model's tool-call format, each
  {"name": a tool's name, "arguments": valid against its parameters}. Only the Hermes / Qwen
  format (`<tool_call>` blocks) can be constrained, so this needs tool_call_parser "hermes".
  "auto" and "none" constrain nothing; with "none" the facade does not parse calls either.

Every mistake is an InvalidRequest naming the field ("structured.json_schema", "tool_choice", ...).
"""
from __future__ import annotations

import json
from typing import Any

from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import choice_problem, regex_problem, schema_text_problem, tool_call_schema

TOOL_CHOICE_MODES = ("", "auto", "none", "required", "function")


class InvalidRequest(ValueError):
    """A client mistake: becomes INVALID_ARGUMENT naming `param`."""

    def __init__(self, message: str, param: str, code: str = ""):
        super().__init__(message)
        self.param = param
        self.code = code


def _structured_fields(s: pb.StructuredOutput) -> dict[str, Any] | None:
    """params.structured -> StructuredOutput's keyword arguments, each value checked."""
    kind = s.WhichOneof("constraint")
    if kind is None:
        return None
    param = f"structured.{kind}"
    if kind == "json_schema":
        problem = schema_text_problem(s.json_schema)
        if problem:
            raise InvalidRequest(f"{param} {problem}", param)
        return {"json": s.json_schema}
    if kind == "json_object":
        return {"json_object": True} if s.json_object else None
    if kind == "regex":
        problem = regex_problem(s.regex)
        if problem:
            raise InvalidRequest(f"{param} {problem}", param)
        return {"regex": s.regex}
    if kind == "choice":
        problem = choice_problem(list(s.choice.choices))
        if problem:
            raise InvalidRequest(f"{param} {problem}", param)
        return {"choice": tuple(s.choice.choices)}
    if not s.grammar.strip():
        raise InvalidRequest(f"{param} must be a non-empty Lark grammar", param)
    return {"grammar": s.grammar}


def _tool_call_fields(request: pb.GenerateRequest, tool_call_parser: str) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice.mode not in TOOL_CHOICE_MODES:
        raise InvalidRequest(f"tool_choice.mode is {choice.mode!r}; expected auto, none, required or function",
                             "tool_choice")
    if choice.mode != "function" and choice.function_name:
        raise InvalidRequest("tool_choice.function_name goes with mode \"function\" only", "tool_choice")
    if choice.mode not in ("required", "function"):
        return None
    tools = list(request.messages.tools) if request.WhichOneof("input") == "messages" else []
    if not tools:
        raise InvalidRequest(f"tool_choice {choice.mode!r} needs tools: the request has none", "tool_choice")
    if tool_call_parser != "hermes":
        raise InvalidRequest(f"tool_choice {choice.mode!r} needs a tool-call format to constrain the output to, and "
                             "this server has none (its chat template writes no <tool_call> blocks); start "
                             "`astrai serve` with --tool-call-parser hermes if the model writes them", "tool_choice")
    if choice.mode == "function":
        tools = [t for t in tools if t.name == choice.function_name]
        if not tools:
            raise InvalidRequest(f"tool_choice names the function {choice.function_name!r:.80}, which is not among "
                                 "the request's tools", "tool_choice")
    schemas = []
    for tool in tools:   # the parameters were checked when the chat was rendered
        parameters = json.loads(tool.parameters) if tool.parameters else None
        schemas.append(json.dumps(tool_call_schema(tool.name, parameters)))
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return {"tool_calls": tuple(schemas), "parallel_tool_calls": parallel}


def structured_output(request: pb.GenerateRequest, tool_call_parser: str) -> Any:
    """The request's StructuredOutput, or None when its output is free."""
    fields = _structured_fields(request.params.structured) if request.params.HasField("structured") else None
    tool_fields = _tool_call_fields(request, tool_call_parser)
    if fields is not None and tool_fields is not None:
        raise InvalidRequest(f"tool_choice {request.tool_choice.mode!r} constrains the output to tool calls, so it "
                             "cannot also be constrained by params.structured: set one of them", "tool_choice")
    fields = fields or tool_fields
    if fields is None:
        return None
    # the engine package: imported only when serving (its __init__ brings torch)
    from astrai_serve.engine.structured_spec import StructuredOutput

    try:
        return StructuredOutput(**fields)
    except ValueError as exc:
        raise InvalidRequest(str(exc), "tool_choice" if tool_fields else "structured") from None
