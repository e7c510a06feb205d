"""StructuredOutput -> the grammar text llguidance compiles (one function per kind).

JSON is generated the way `json.dumps` writes it, which is also how chat templates render tool
calls (`tojson`): ", " between items, ": " after keys, no other whitespace. Fixed separators keep
a model from spending its tokens on whitespace (a JSON grammar that allows any whitespace lets a
weak model pad forever), and match what models were trained on. A schema may override this with
its own "x-guidance" options (llguidance's), e.g. {"x-guidance": {"whitespace_flexible": true}}.

Tool calls: `<tool_call>\\n{json}\\n</tool_call>` (Qwen / Hermes), the JSON one of the functions'
call schemas. Each schema is its own `%json` document, so a "$ref" inside one resolves against
that schema alone; "$defs" / "definitions" a client left inside the function's parameters (as
pydantic writes them) are hoisted to the call schema's root, where "#/$defs/..." points.
"""
from __future__ import annotations

import json
from typing import Any

from ..structured_spec import StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"


def _with_options(schema: Any) -> Any:
    if isinstance(schema, dict) and "x-guidance" not in schema:
        return {"x-guidance": JSON_OPTIONS, **schema}
    return schema


def _hoist_definitions(call: dict) -> dict:
    args = call.get("properties", {}).get("arguments") if isinstance(call.get("properties"), dict) else None
    if not isinstance(args, dict):
        return call
    moved = {k: args[k] for k in ("$defs", "definitions") if k in args and k not in call}
    if not moved:
        return call
    args = {k: v for k, v in args.items() if k not in moved}
    return {**call, **moved, "properties": {**call["properties"], "arguments": args}}


def _lark_literal(text: str) -> str:
    return json.dumps(text)   # a JSON string is a Lark string literal (llguidance reads its escapes)


def tool_calls_lark(schemas: tuple[str, ...], parallel: bool) -> str:
    calls = [_with_options(_hoist_definitions(json.loads(s))) for s in schemas]
    lines = ["start: call" + (f" ({_lark_literal(TOOL_CALL_SEPARATOR)} call)*" if parallel else ""),
             f"call: {_lark_literal(TOOL_CALL_OPEN)} body {_lark_literal(TOOL_CALL_CLOSE)}",
             "body: " + " | ".join(f"fn{i}" for i in range(len(calls)))]
    lines += [f"fn{i}: %json {json.dumps(c, ensure_ascii=False)}" for i, c in enumerate(calls)]
    return "\n".join(lines) + "\n"


def grammar_of(spec: StructuredOutput) -> str:
    """The llguidance grammar (its JSON form) for `spec`. Nothing is checked here: the matcher
    (or `LLMatcher.validate_grammar`) reports what is wrong."""
    from llguidance import LLMatcher

    kind = spec.kind
    if kind == "json":
        return LLMatcher.grammar_from_json_schema(spec.json, defaults=JSON_OPTIONS)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec.regex)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(_lark_literal(c) for c in spec.choice) + "\n")
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(spec.grammar)
    return LLMatcher.grammar_from_lark(tool_calls_lark(spec.tool_calls, spec.parallel_tool_calls))


def error_for(spec: StructuredOutput, why: str) -> ValueError:
    """The per-request error, naming the field as StructuredOutput's own checks do."""
    kind = spec.kind
    value = getattr(spec, kind)
    why = " ".join(why.split())   # llguidance's messages span lines (a caret under the column)
    return ValueError(f"invalid structured output {kind}={value!r:.200}: {why}")
