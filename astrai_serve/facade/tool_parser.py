"""Tool calls in generated text: the Hermes / Qwen format, parsed as the text streams in.

    Let me look.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(`--tool-call-parser hermes`, as vLLM names it.) A parser per choice takes the text deltas and
emits events: Content (text outside the tags), CallStart (a call's id and name, as soon as its
name is complete) and Arguments (the next fragment of its arguments, as the model writes them),
which the REST facade turns into OpenAI's `delta.content` / `delta.tool_calls` chunks. A whole
response is the same events, gathered (`parse_whole`), so streamed and whole answers agree.

- The arguments are the model's own text of the "arguments" value (valid JSON once the call
  closes), not a re-serialisation: each fragment can go out the moment it is read, and the
  fragments join to exactly the whole response's `arguments`.
- Text that may be the start of "<tool_call>" is held back until it is known not to be.
  Trailing whitespace is held until more content follows; once a call was made, whitespace left
  over at the end (the newlines before, between and after the tags) is dropped, so a reply that
  is only calls has null content.
- A call whose JSON does not parse (or has no string name) is no call: a whole response keeps its
  text as content, as vLLM's parser does. A stream cannot take back what it sent: there, a call
  whose name was read goes out, and its arguments may not parse. The grammar-constrained
  tool_choice "required" / named function rule that out.
- A call cut off by max_tokens or lacking its closing tag still counts if its JSON is whole.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

START, END = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int      # the call's index in the choice's tool_calls
    id: str
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str       # the next fragment of the call's arguments (JSON text)


Event = Content | CallStart | Arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class _JsonObjectScan:
    """Scans one call's JSON object a character at a time, as it arrives: where each top-level
    member's value starts and ends, without waiting for the whole object."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0
        self.depth = 0               # 1 inside the object, more inside a member's value
        self.in_string = False
        self.escape = False
        self.state = "open"          # open, key_or_end, key, colon, value, in_value, after, key_next
        self.key: str | None = None
        self.key_start = 0
        self.value_start = 0
        self.scalar = False          # the value being read is a number / true / false / null
        self.members: dict[str, tuple[int, int]] = {}   # key -> [start, end) of its value's text
        self.closed = False          # the object's closing brace was read
        self.bad = False             # not a JSON object
        self.stop = 0                # with closed or bad: where scanning stopped

    def feed(self, text: str) -> None:
        self.text += text
        while self.pos < len(self.text) and not (self.closed or self.bad):
            self._char(self.text[self.pos], self.pos)
            self.pos += 1

    def _end_value(self, end: int) -> None:
        self.members[self.key or ""] = (self.value_start, end)
        self.state = "after"

    def _char(self, c: str, i: int) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                if self.depth == 1 and self.state == "key":
                    try:
                        self.key = json.loads(self.text[self.key_start:i + 1])
                    except json.JSONDecodeError:
                        self._fail(i)
                        return
                    self.state = "colon"
                elif self.depth == 1 and self.state == "in_value":
                    self._end_value(i + 1)
            return
        if self.depth == 0:
            if c == "{":
                self.depth, self.state = 1, "key_or_end"
            elif not c.isspace():
                self._fail(i)
            return
        if self.depth > 1:   # inside a member's object / array value
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._end_value(i + 1)
            return
        if self.state == "in_value" and self.scalar:
            if not (c in ",}" or c.isspace()):
                return
            self._end_value(i)
        if c.isspace():
            return
        if self.state in ("key_or_end", "key_next") and c == '"':
            self.in_string, self.key_start, self.state = True, i, "key"
        elif self.state in ("key_or_end", "after") and c == "}":
            self.closed, self.depth, self.stop = True, 0, i + 1
        elif self.state == "colon" and c == ":":
            self.state = "value"
        elif self.state == "value":
            self.value_start, self.state, self.scalar = i, "in_value", False
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            else:
                self.scalar = True
        elif self.state == "after" and c == ",":
            self.state = "key_next"
        else:
            self._fail(i)

    def _fail(self, i: int) -> None:
        self.bad, self.stop = True, i

    def value(self, key: str) -> str | None:
        span = self.members.get(key)
        return self.text[span[0]:span[1]] if span else None

    def partial(self, key: str) -> str:
        """What is read so far of `key`'s value when it is an object, array or string (every
        character of those is part of the value as soon as it is read); "" otherwise."""
        if key in self.members:
            return self.value(key) or ""
        if self.state == "in_value" and self.key == key and not self.scalar:
            return self.text[self.value_start:self.pos]
        return ""


@dataclass
class _Call:
    index: int
    scan: _JsonObjectScan = field(default_factory=_JsonObjectScan)
    id: str = ""
    name: str | None = None      # set once the name is read (and CallStart went out)
    sent: int = 0                # characters of the arguments sent
    raw: str = ""                # the text between the tags, once the call ended
    tagged: bool = False         # it ended with </tool_call> (not with the text)

    def text(self) -> str:
        """The call as the model wrote it, tags included."""
        return START + self.raw + (END if self.tagged else "")

    def arguments(self) -> str:
        value = self.scan.value("arguments")
        return value if value is not None else "{}"

    def valid(self) -> bool:
        if not (self.scan.closed and isinstance(self.name, str)):
            return False
        value = self.scan.value("arguments")
        try:
            return value is None or isinstance(json.loads(value), dict)
        except json.JSONDecodeError:
            return False


class HermesToolParser:
    """One choice's text -> events. feed() each delta, finish() once at the end."""

    def __init__(self) -> None:
        self.pending = ""                 # outside a call: text not yet known to be content
        self.whitespace = ""              # content held back: whitespace only, so far
        self.call: _Call | None = None    # the call being read
        self.calls: list[_Call] = []
        self.segments: list[str | _Call] = []   # the text in order: content pieces and calls (parse_whole)

    @property
    def called(self) -> bool:
        """Whether any call went out (its CallStart was emitted)."""
        return any(c.name is not None for c in self.calls)

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        while text:
            if self.call is None:
                text = self._outside(text, events)
            else:
                text = self._inside(text, events)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.call is not None:
            self._end_call(events)
        if self.pending:
            self._content(self.pending, events)
            self.pending = ""
        if self.whitespace and not self.called:
            events.append(Content(self.whitespace))
        self.whitespace = ""
        return events

    # ---- outside a call --------------------------------------------------------------------
    def _outside(self, text: str, events: list[Event]) -> str:
        """Consume text outside a call; return what follows a <tool_call> tag (for _inside)."""
        self.pending += text
        at = self.pending.find(START)
        if at >= 0:
            self._content(self.pending[:at], events)
            rest, self.pending = self.pending[at + len(START):], ""
            self.call = _Call(len(self.calls))
            self.calls.append(self.call)
            self.segments.append(self.call)
            return rest
        keep = _held_prefix(self.pending, START)
        self._content(self.pending[:len(self.pending) - keep], events)
        self.pending = self.pending[len(self.pending) - keep:]
        return ""

    def _content(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        self.segments.append(text)
        held = self.whitespace + text
        ready = held.rstrip()   # trailing whitespace waits: it may turn out to end the content
        if ready:
            events.append(Content(ready))
        self.whitespace = held[len(ready):]

    # ---- inside a call ---------------------------------------------------------------------
    def _inside(self, text: str, events: list[Event]) -> str:
        """Consume a call's text; return what follows its </tool_call> (for _outside)."""
        call = self.call
        assert call is not None
        scan = call.scan
        before = len(scan.text)
        scan.feed(text)
        self._emit(call, events)
        if not (scan.closed or scan.bad):
            return ""   # a </tool_call> inside a string value is part of the value
        at = scan.text.find(END, max(scan.stop, before - len(END)))
        if at < 0:
            return ""
        rest = scan.text[at + len(END):]
        scan.text, call.tagged = scan.text[:at], True
        self._end_call(events)
        return rest

    def _emit(self, call: _Call, events: list[Event]) -> None:
        scan = call.scan
        if call.name is None:
            name = scan.value("name")
            if name is None:
                return
            try:
                call.name = json.loads(name)
            except json.JSONDecodeError:
                call.name = None
            if not isinstance(call.name, str):
                call.name = None
                return
            call.id = new_call_id()
            events.append(CallStart(call.index, call.id, call.name))
        arguments = scan.partial("arguments")
        if len(arguments) > call.sent:
            events.append(Arguments(call.index, arguments[call.sent:]))
            call.sent = len(arguments)

    def _end_call(self, events: list[Event]) -> None:
        call = self.call
        assert call is not None
        self.call, call.raw = None, call.scan.text
        self._emit(call, events)
        if call.name is None:   # never became a call: the text goes out as content after all
            events.append(Content(self.whitespace + call.text()))
            self.whitespace = ""
        elif call.sent == 0 and call.scan.value("arguments") is None:
            events.append(Arguments(call.index, "{}"))   # a call without arguments: an empty object
            call.sent = 2


def parse_whole(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole response: (content or None, OpenAI tool_calls). Calls that do not parse stay in the
    content as the model wrote them."""
    parser = HermesToolParser()
    events = parser.feed(text) + parser.finish()
    valid = [c for c in parser.calls if c.valid()]
    if len(valid) == len(parser.calls):
        content = "".join(e.text for e in events if isinstance(e, Content))
    else:   # rebuild the text around the calls that are not calls
        pieces = []
        for s in parser.segments:
            if isinstance(s, str):
                pieces.append(s)
            elif not s.valid():
                pieces.append(s.text())
        content = "".join(pieces)
        if valid and not content.strip():
            content = ""
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments()}}
             for c in valid]
    return content or None, calls
