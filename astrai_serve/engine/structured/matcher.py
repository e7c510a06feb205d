"""SequenceMatcher: one sample's position in its grammar.

It advances by the sample's generated tokens as the host learns them (`advance`), never by a
prompt token, and remembers how many it has consumed: the mask of the next token is right only
once every generated token is in, which `fill` (bitmask.py) checks. Preemption keeps a sequence's
tokens (it is recomputed, not restarted), so its matcher stays as it is.

`done`: the grammar admits nothing more (a closed JSON object, the last character of a choice):
the engine finishes the sample there with "stop", its last token being text, not an eos. A
grammar that is complete but could go on (a number, or another tool call) leaves the choice to the
model: its mask then allows the eos ids too, and an eos ends the sample as usual.
"""
from __future__ import annotations

from typing import Any


class SequenceMatcher:
    __slots__ = ("ll", "consumed", "done", "error")

    def __init__(self, template: Any) -> None:
        self.ll = template.deep_copy()   # an llguidance LLMatcher of its own
        self.consumed = 0                # generated tokens consumed so far
        self.done = False                # nothing but eos can follow
        self.error: str | None = None    # the matcher refused a token or hit a limit

    def advance(self, completion: list[int]) -> None:
        """Consume the generated tokens not consumed yet (usually the one new token)."""
        new = completion[self.consumed:]
        if not new or self.done or self.error is not None:
            self.consumed = len(completion)
            return
        if not self.ll.consume_tokens(new):
            self.error = self.ll.get_error() or f"token {new} is not allowed by the grammar"
        self.consumed = len(completion)
        if self.error is None and self.ll.is_stopped():
            self.done = True
