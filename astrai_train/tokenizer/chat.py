"""Chat templates: jinja2 rendering compatible with Hugging Face, and the assistant loss mask.

Templates come from model directories downloaded from the Hub, i.e. untrusted code, so they run
in jinja2's immutable sandbox with the same helpers HF offers (raise_exception, tojson,
strftime_now, loop controls, the `{% generation %}` tag) and the same whitespace settings, so a
template renders here exactly as it does in `transformers`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from astrai_train.tokenizer.specials import CHAT_ROLES

# Stands in for one assistant message's content when locating where that content starts. Private
# use code points, so no real message or template text contains it.
_MARKER = "\ue000astrai-content\ue001"


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: HF templates mark assistant text with it. We find
    assistant spans ourselves (see assistant_mask), so the tag only has to render its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without dunder/underscore attributes, which could reach interpreter
    internals from a hostile template."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes, which would corrupt prompts; HF overrides it the same way.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once (cached by source); a syntax error is a ValueError."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid jinja2 (line {e.lineno}): {e.message}") from None


def plain_data(value: Any, where: str) -> Any:
    """A JSON-typed copy of what the template may see: no caller objects (with methods the sandbox
    does not know about) reach the template, and the caller's dicts are never modified."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_data(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where}: values of type {type(value).__name__} cannot be passed to a chat template")


def _check_tool_calls(calls: Any, i: int) -> None:
    """An assistant's tool_calls, in transformers' shape: [{"type": "function", "id"?, "function":
    {"name": str, "arguments": dict or JSON text}}] (a bare {"name", "arguments"} too)."""
    if not isinstance(calls, (list, tuple)) or not calls:
        raise ValueError(f"message {i} (assistant) tool_calls must be a non-empty list, got {calls!r:.80}")
    for j, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"message {i} (assistant) tool_calls[{j}] must be a dict with a function name, "
                             f"got {call!r:.80}")
        if not isinstance(function.get("arguments", {}), (dict, str)):
            raise ValueError(f"message {i} (assistant) tool_calls[{j}] arguments must be a dict or JSON text")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check roles and contents; return plain copies. Errors name the message index and value.

    An assistant message may carry `tool_calls` (its content may then be None), a "tool" message
    answers one; the template decides how both read."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"message {i} has no {key!r} (keys: {sorted(message)})")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"message {i} has role {role!r}; allowed roles are {', '.join(CHAT_ROLES)}")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ValueError(f"message {i} ({role}) has tool_calls; only assistant messages make tool calls")
            _check_tool_calls(calls, i)
        if not isinstance(content, str) and not (content is None and calls):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}: {content!r}")
        out.append(plain_data(message, f"message {i}"))
    return out


def check_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Tools as transformers passes them to a template: JSON-schema dicts, usually
    {"type": "function", "function": {"name", "description", "parameters"}}; None = no tools."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise ValueError(f"tools must be a list of JSON-schema dicts, got {tools!r:.80}")
    return plain_data(list(tools), "tools") or None


@dataclass(frozen=True)
class TemplateFeatures:
    """What a chat template does with tools, read from its source (for clear errors rather than
    tools silently left out of the prompt)."""

    tools: bool           # it reads the `tools` variable (renders tool signatures)
    tool_calls: bool      # it reads messages' tool_calls (renders an assistant's calls)
    hermes_calls: bool    # its tool-call format is Hermes / Qwen: <tool_call>{json}</tool_call>


@lru_cache(maxsize=16)
def template_features(source: str) -> TemplateFeatures:
    env = compile_template(source).environment
    variables = jinja2.meta.find_undeclared_variables(env.parse(source))
    return TemplateFeatures(tools="tools" in variables, tool_calls="tool_calls" in source,
                            hermes_calls="<tool_call>" in source)


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
           variables: dict[str, Any], continue_final_message: bool = False) -> str:
    """Render validated messages. `variables` are the special token strings plus caller extras
    (e.g. enable_thinking, tools); a template's raise_exception becomes a ValueError.

    continue_final_message: the text ends right after the last message's content, its turn left
    open for the model to continue (transformers' rule: cut after the content's last occurrence)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set: one continues "
                         "the last message, the other opens a new assistant turn")
    final = messages[-1].get("content") if continue_final_message and messages else None
    if continue_final_message and (not isinstance(final, str) or not final.strip()):
        raise ValueError("continue_final_message needs a last message with text content to continue")
    try:
        text = compile_template(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None
    if final is not None:
        at = text.rfind(final.strip())
        if at < 0:
            raise ValueError("continue_final_message: the chat template does not render the last message's "
                             "content as it is, so the prompt cannot end inside it")
        keep = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(final.strip())
        text = text[:at + keep]
    return text


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, by bisection over C-speed slice compares."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def assistant_char_spans(template: str, messages: list[dict[str, Any]], text: str,
                         variables: dict[str, Any], end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `text` (the full render) that each assistant turn must
    generate: from where its content starts through its end-of-turn token.

    Works for any template without knowing its syntax: render again with that one message's
    content replaced by a marker; the two renders agree up to where the content starts (a template
    that reformats content, e.g. Qwen3 moving reasoning into <think>, diverges there too, which
    still puts the start at the first content-dependent character). The turn ends at the first
    end-of-turn token after that point.
    """
    spans: list[tuple[int, int]] = []
    floor = 0  # spans must come in message order, after the previous turn's end
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        marked = [dict(m, content=_MARKER) if j == i else m for j, m in enumerate(messages)]
        probe = render(template, marked, False, variables)
        start = _common_prefix_len(text, probe)
        eot = text.find(end_of_turn, start)
        if eot < 0:
            raise ValueError(
                f"message {i} (assistant): the chat template emits no end-of-turn token {end_of_turn!r} "
                "after the assistant content, so the loss mask cannot mark where the turn ends"
            )
        if start < floor:
            raise ValueError(
                f"message {i} (assistant): the chat template renders this message's content before "
                "earlier messages end; cannot tell which tokens the assistant generates"
            )
        spans.append((start, eot + len(end_of_turn)))
        floor = eot + len(end_of_turn)
    return spans


def mask_from_spans(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for every token that overlaps one of the character spans. A token that straddles the span
    start (BPE merged template text with the first content bytes) is generated by the model, so it
    counts."""
    mask = [0] * len(offsets)
    k = 0
    for j, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k == len(spans):
            break
        lo, hi = spans[k]
        if e > lo and s < hi:
            mask[j] = 1
    return mask
