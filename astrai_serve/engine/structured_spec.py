"""StructuredOutput: what a request's output must match (a JSON Schema, a regex, a choice, a grammar).

This is the request side only: plain, validated, hashable data that the REST facade, the gRPC
core and `LLM.generate` fill in and SamplingParams carries (`SamplingParams.structured`). The
engine compiles it into a token-level grammar (astrai_serve/engine/structured/) and masks each
constrained sample's logits with it; compiled grammars are cached by `key()`.

Exactly one of the constraint fields is set:
- json: a JSON Schema, as JSON text (canonicalised here: spacing does not split the cache; key order
  is kept, since a schema's property order is the order the output writes them in)
- json_object: any JSON object (OpenAI's `response_format: {"type": "json_object"}`)
- regex: a regular expression the whole output must match
- choice: the output is exactly one of these strings
- grammar: a grammar in Lark syntax (vLLM's `structured_outputs.grammar` / `guided_grammar`)
- tool_calls: one JSON Schema per callable function (each: {"name": const, "arguments": its
  parameters}); the output is one (parallel_tool_calls False) or one or more tool calls in the
  model's tool-call format, `<tool_call>\\n{json}\\n</tool_call>` (Qwen / Hermes), as OpenAI's
  `tool_choice: "required"` or a named function asks
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")


def canonical_json(value: Any) -> str:
    """One text per JSON value: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Any) -> str:
    """A schema's text without its spacing, its keys in their order: the properties of an object
    are generated in the order the schema lists them (as OpenAI's strict mode does), so two
    orders are two grammars, and two cache entries."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class StructuredOutput:
    json: str | None = None                       # JSON Schema as JSON text
    json_object: bool = False                     # any JSON object
    regex: str | None = None                      # the whole output matches this regex
    choice: tuple[str, ...] | None = None         # the output is one of these strings
    grammar: str | None = None                    # a Lark grammar
    tool_calls: tuple[str, ...] | None = None     # per function, the JSON Schema of one call (JSON text)
    parallel_tool_calls: bool = True              # with tool_calls: one or more calls (False: exactly one)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid structured output {name}={getattr(self, name)!r:.200}: {why}")

        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        if isinstance(self.tool_calls, list):
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"a structured output sets exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_) or 'none'}")
        if self.json is not None:
            if not isinstance(self.json, str):
                raise bad("json", "must be JSON text")
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as err:
                raise bad("json", f"is not valid JSON ({err})") from None
            if not isinstance(schema, (dict, bool)):
                raise bad("json", "a JSON Schema is an object (or true/false)")
            object.__setattr__(self, "json", compact_json(schema))
        if self.regex is not None:
            if not isinstance(self.regex, str) or not self.regex:
                raise bad("regex", "must be a non-empty string")
            try:
                re.compile(self.regex)
            except re.error as err:
                raise bad("regex", f"does not compile ({err})") from None
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise bad("choice", "must be a non-empty list of non-empty strings")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise bad("grammar", "must be a non-empty grammar text")
        if self.tool_calls is not None:
            if not self.tool_calls:
                raise bad("tool_calls", "must name at least one function")
            canon = []
            for text in self.tool_calls:
                try:
                    schema = json.loads(text) if isinstance(text, str) else None
                except json.JSONDecodeError:
                    schema = None
                if not isinstance(schema, dict):
                    raise bad("tool_calls", "each entry must be a JSON Schema object as JSON text")
                canon.append(compact_json(schema))
            object.__setattr__(self, "tool_calls", tuple(canon))
        if not isinstance(self.parallel_tool_calls, bool):
            raise bad("parallel_tool_calls", "must be true or false")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """The compiled-grammar cache key: the kind and its canonical value."""
        value = getattr(self, self.kind)
        if self.kind == "tool_calls":
            value = [list(value), self.parallel_tool_calls]
        return canonical_json([self.kind, list(value) if isinstance(value, tuple) else value])
