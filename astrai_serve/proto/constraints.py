"""Checks both ends of the gRPC contract apply to tools and structured-output constraints, so the
REST facade and the core refuse the same values with the same words: a tool's name, a JSON
Schema, a regular expression, and the schema of one tool call.

Each check returns None when the value is fine, else why it is not (the caller names the field).
Needs no torch and nothing of astrai_train: the facade imports it too.
"""
from __future__ import annotations

import json
import re
from typing import Any

# OpenAI's rule for function (and response_format) names.
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")
MAX_CHOICES = 1024          # strings in one choice constraint
MAX_TOOLS = 128             # OpenAI's limit on tools per request


def name_problem(name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return "a name is required"
    if not NAME_PATTERN.fullmatch(name):
        return f"{name!r:.80} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_' and '-'"
    return None


def schema_problem(schema: Any) -> str | None:
    """Why `schema` (parsed JSON) is not a JSON Schema, checked against its own metaschema (the
    draft its $schema names, else 2020-12) with the `jsonschema` package."""
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, dict):
        return f"a JSON Schema is an object (or true / false), got {type(schema).__name__}"
    import jsonschema  # imported here: only requests with a schema need it

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.absolute_path)
        return f"is not a valid JSON Schema: {err.message:.300}" + (f" (at {where})" if where else "")
    return None


def schema_text_problem(text: str) -> str | None:
    """schema_problem for a schema given as JSON text."""
    try:
        schema = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        return f"is not valid JSON: {err}"
    return schema_problem(schema)


def regex_problem(pattern: Any) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return "must be a non-empty string"
    try:
        re.compile(pattern)
    except re.error as err:
        return f"does not compile: {err}"
    except RecursionError:
        return "is nested too deeply"
    return None


def choice_problem(choices: Any) -> str | None:
    if not isinstance(choices, (list, tuple)) or not choices:
        return "must be a non-empty array of strings"
    if len(choices) > MAX_CHOICES:
        return f"may hold at most {MAX_CHOICES} strings, got {len(choices)}"
    if not all(isinstance(c, str) and c for c in choices):
        return "must hold non-empty strings only"
    return None


def tool_call_schema(name: str, parameters: Any) -> dict[str, Any]:
    """The JSON Schema of one call of function `name` (what StructuredOutput.tool_calls holds per
    function): {"name": that name, "arguments": its parameters}. No parameters: any object."""
    arguments = parameters if parameters not in (None, {}) else {"type": "object"}
    # additionalProperties false: a call is exactly these two keys (the parser reads no others)
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"], "additionalProperties": False}
