"""Output constraints in a request body -> the core's StructuredOutput (SamplingParams.structured).

Spellings accepted, on chat and completions alike (as vLLM accepts them):
- OpenAI's response_format: {"type": "text"} (no constraint), {"type": "json_object"},
  {"type": "json_schema", "json_schema": {"name", "description"?, "schema"?, "strict"?}} (no
  schema: any JSON object). Strict or not, the output is constrained to the schema.
- vLLM's structured_outputs: {"json": schema (object or JSON text) | "regex": str | "choice": [str]
  | "grammar": Lark text | "json_object": true}, exactly one key.
- vLLM's older guided_json, guided_regex, guided_choice, guided_grammar.

At most one constraint per request: two (say response_format and guided_regex, or either with a
constraining tool_choice) are a 400 naming both. Schemas are checked to be JSON Schema, regexes to
compile, before anything reaches the core.
"""
from __future__ import annotations

import json
from typing import Any

from astrai_serve.facade.errors import bad, get_bool, get_str, type_name
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto.constraints import choice_problem, name_problem, regex_problem, schema_problem

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FIELDS = ("response_format", "structured_outputs", *GUIDED)   # the body fields this module reads
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _schema(value: Any, param: str) -> str:
    """A JSON Schema given as an object or as JSON text -> checked JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as err:
            raise bad(param, f"'{param}' is not valid JSON: {err}") from None
    problem = schema_problem(value)
    if problem:
        raise bad(param, f"'{param}' {problem}")
    return json.dumps(value, ensure_ascii=False)


def _one(kind: str, value: Any, param: str) -> pb.StructuredOutput:
    """One constraint of kind json | regex | choice | grammar | json_object."""
    if kind == "json":
        return pb.StructuredOutput(json_schema=_schema(value, param))
    if kind == "json_object":
        if value is not True:
            raise bad(param, f"'{param}' must be true (or left out), got {value!r:.40}")
        return pb.StructuredOutput(json_object=True)
    if kind == "regex":
        problem = regex_problem(value)
        if problem:
            raise bad(param, f"'{param}' {problem}")
        return pb.StructuredOutput(regex=value)
    if kind == "choice":
        problem = choice_problem(value)
        if problem:
            raise bad(param, f"'{param}' {problem}")
        return pb.StructuredOutput(choice=pb.ChoiceList(choices=value))
    if not isinstance(value, str) or not value.strip():
        raise bad(param, f"'{param}' must be a non-empty Lark grammar")
    return pb.StructuredOutput(grammar=value)


def _response_format(value: Any) -> pb.StructuredOutput | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise bad(param, f"'{param}' must be an object like {{\"type\": \"json_object\"}}, got {type_name(value)}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return pb.StructuredOutput(json_object=True)
    if kind != "json_schema":
        raise bad(f"{param}.type", f"'{param}.type' must be \"text\", \"json_object\" or \"json_schema\", "
                                   f"got {kind!r:.40}")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"{param}.json_schema", f"'{param}.json_schema' must be an object with a name and a schema")
    problem = name_problem(spec.get("name"))
    if problem:
        raise bad(f"{param}.json_schema.name", f"'{param}.json_schema.name': {problem}")
    get_str(spec, "description", f"{param}.json_schema.description")
    get_bool(spec, "strict", f"{param}.json_schema.strict")
    if spec.get("schema") is None:
        return pb.StructuredOutput(json_object=True)
    if not isinstance(spec["schema"], dict):
        raise bad(f"{param}.json_schema.schema", f"'{param}.json_schema.schema' must be a JSON Schema object")
    return pb.StructuredOutput(json_schema=_schema(spec["schema"], f"{param}.json_schema.schema"))


def _structured_outputs(value: Any) -> pb.StructuredOutput | None:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise bad(param, f"'{param}' must be an object with one of {', '.join(STRUCTURED_KEYS)}, got {type_name(value)}")
    unknown = [k for k in value if k not in STRUCTURED_KEYS]
    if unknown:
        raise bad(f"{param}.{unknown[0]}", f"'{param}.{unknown[0]}' is not supported; '{param}' takes one of "
                                           f"{', '.join(STRUCTURED_KEYS)}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) > 1:
        raise bad(f"{param}.{given[1]}", f"'{param}' sets {' and '.join(given)}: set exactly one constraint")
    return _one(given[0], value[given[0]], f"{param}.{given[0]}") if given else None


def output_constraint(body: dict) -> tuple[pb.StructuredOutput | None, str | None]:
    """(the request's constraint, the body field that set it), or (None, None)."""
    found: list[tuple[str, pb.StructuredOutput]] = []
    for field in FIELDS:
        value = body.get(field)
        if value is None:
            continue
        if field == "response_format":
            constraint = _response_format(value)
        elif field == "structured_outputs":
            constraint = _structured_outputs(value)
        else:
            constraint = _one(field.removeprefix("guided_"), value, field)
        if constraint is not None:
            found.append((field, constraint))
    if len(found) > 1:
        raise bad(found[1][0], f"'{found[0][0]}' and '{found[1][0]}' both constrain the output: set only one")
    return (found[0][1], found[0][0]) if found else (None, None)
