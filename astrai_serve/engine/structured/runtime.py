"""StructuredRuntime: what LLMEngine does for requests under a grammar, in one place.

- admission (`admit`): the request's grammar comes from the compiler's cache, or is compiled on
  the pool while `add_request` waits at most `wait_s` for it (EngineConfig's
  structured_compile_wait_s; 0: never). Done in time, an error raises there (the caller's
  ValueError naming the field, as for any bad parameter: everyday schemas compile in 0.4-2 ms,
  so this is the usual path) and a success starts the request at once; still compiling, the
  request is held here, out of the scheduler, so it cannot stall a step, and `take_ready` hands
  it to the scheduler once the future is done, or fails it: its samples then end with
  finish_reason "abort", no tokens and RequestOutput.error saying why.
- per step: `advance` feeds each constrained sample its new tokens after the host read them;
  `masks` fills the token bitmasks of the constrained rows about to be sampled.
"""
from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any

import torch

from ..sequence import Sequence
from ..structured_spec import StructuredOutput
from .bitmask import DeviceMask, MaskFiller
from .compiler import GrammarCompiler
from .matcher import SequenceMatcher


@dataclass
class Held:
    """A request whose grammar is still compiling."""

    request_id: str
    samples: list[Sequence]
    future: cf.Future


class StructuredRuntime:
    def __init__(self, tokenizer: Any, vocab_size: int, device: torch.device, wait_s: float) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        self.wait_s = wait_s
        self._vocab_size, self._device = vocab_size, device
        self._filler: MaskFiller | None = None       # made at the first constrained step
        self.held: dict[str, Held] = {}
        self.live = 0          # samples with a matcher (the engine decrements it as they finish)

    @property
    def num_held(self) -> int:
        return sum(len(h.samples) for h in self.held.values())

    # ---- admission ---------------------------------------------------------------------------
    def admit(self, request_id: str, spec: StructuredOutput, samples: list[Sequence]) -> bool:
        """True: the samples have their matchers and may be scheduled now; False: held until the
        grammar compiles. Raises the grammar's ValueError if it is known to be bad by then."""
        cached = self.compiler.has(spec)
        future = self.compiler.compile(spec)
        try:
            if not (cached or self.wait_s):     # 0: never wait for a new grammar
                raise cf.TimeoutError
            template = future.result(timeout=self.wait_s)
        except cf.TimeoutError:
            self.held[request_id] = Held(request_id, samples, future)
            return False
        self._attach(samples, template)
        return True

    def take_ready(self, block: bool = False) -> list[tuple[Held, str | None]]:
        """Held requests whose grammar is done, each with None (matchers attached: schedule it)
        or the error that fails it. block: wait (briefly) for one if none is done yet."""
        if not self.held:
            return []
        if block and not any(h.future.done() for h in self.held.values()):
            cf.wait([h.future for h in self.held.values()], timeout=0.05, return_when=cf.FIRST_COMPLETED)
        out = []
        for rid, h in list(self.held.items()):
            if not h.future.done():
                continue
            del self.held[rid]
            try:
                self._attach(h.samples, h.future.result())
                out.append((h, None))
            except ValueError as err:
                out.append((h, str(err)))
        return out

    def cancel(self, request_id: str) -> bool:
        """Forget a held request (aborted); True if it was held."""
        return self.held.pop(request_id, None) is not None

    # ---- per step ----------------------------------------------------------------------------
    @staticmethod
    def advance(seqs: list[Sequence]) -> None:
        """Feed the constrained samples among `seqs` their newly generated tokens."""
        for seq in seqs:
            m = seq.state.grammar
            if m is not None and m.consumed < seq.num_completion_tokens:
                m.advance(seq.completion_ids)

    def masks(self, seqs: list[Sequence]) -> DeviceMask | None:
        """The bitmasks of the rows of `seqs` (one per sampled row) under a live grammar; None if
        no row is. Finished samples (a row launched ahead whose token will be dropped) go unmasked."""
        rows, matchers, counts = [], [], []
        for i, seq in enumerate(seqs):
            m = seq.state.grammar
            if m is not None and not m.done and m.error is None and not seq.is_finished:
                rows.append(i)
                matchers.append(m)
                counts.append(seq.num_completion_tokens)
        if not rows:
            return None
        if self._filler is None:
            self._filler = MaskFiller(self._vocab_size, self._device)
        return self._filler.fill(rows, matchers, counts)

    def _attach(self, samples: list[Sequence], template: Any) -> None:
        for seq in samples:       # n > 1: each sample its own matcher
            seq.state.grammar = SequenceMatcher(template)
        self.live += len(samples)

    def close(self) -> None:
        self.compiler.close()


def constrained(seqs: list[Sequence]) -> bool:
    return any(s.state is not None and s.state.grammar is not None for s in seqs)
