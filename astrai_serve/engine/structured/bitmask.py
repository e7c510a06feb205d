"""Token bitmasks: filled on the host for the constrained rows of a step, applied on the device.

A mask is one bit per vocabulary id (int32 words, bit i of word j = token 32j + i, 1 = allowed),
the layout llguidance fills. Per step:
- `MaskFiller.fill` computes the masks of the constrained rows straight into a pinned staging
  buffer that also holds the row indices, and sends that buffer to the device with ONE
  non-blocking copy. From PARALLEL_ROWS rows on the masks come from one llguidance call that
  spreads them over its worker threads (the GIL released); fewer are filled in turn, as waking
  the threads costs more than it saves (fill + consume: 16-20 µs a row in turn vs 35-60 µs
  through the executor at 4 rows, this 2-core CPU);
- `apply_bitmask` (the sampler calls it first, before temperature, top-p and the rest) sets the
  disallowed logits of those rows to -inf in a copy of the logits. Rows without a grammar are
  not touched, and the runner's logits (a CUDA graph's output buffer) are never written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..transfer import HostStaging
from .matcher import SequenceMatcher

PARALLEL_ROWS = 8
_EXECUTOR: Any = None    # llguidance's worker threads: one pool per process, shared by its engines


def executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance

        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


@dataclass(frozen=True)
class DeviceMask:
    rows: torch.Tensor   # int64 [k]: the batch rows under a grammar
    bits: torch.Tensor   # int32 [k, ceil(vocab / 32)]: their allowed tokens


class MaskFiller:
    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.words = (vocab_size + 31) // 32
        self.device = device
        self._staging = HostStaging(device, torch.int32)

    def fill(self, rows: list[int], matchers: list[SequenceMatcher], completions: list[int]) -> DeviceMask:
        """Masks of `matchers` (each at the sample's newest token: it has consumed all
        `completions[i]` generated tokens) for batch `rows`."""
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        for m, n in zip(matchers, completions):
            if m.consumed != n:   # a mask from a stale state would let a wrong token through
                raise RuntimeError(f"grammar matcher consumed {m.consumed} tokens, the sample has {n}")
        k, w = len(rows), self.words
        host_t, host = self._staging.take(k + k * w)
        host[:k] = rows
        bits = host[k:].reshape(k, w)
        if k >= PARALLEL_ROWS:
            fill_next_token_bitmask_par(executor(), [(m.ll, i) for i, m in enumerate(matchers)], bits)
        else:
            for i, m in enumerate(matchers):
                fill_next_token_bitmask(m.ll, bits, i)
        if self.device.type == "cpu":
            buf = host_t.clone()                 # the staging buffer is reused two fills later
        else:
            buf = host_t.to(self.device, non_blocking=True)
            self._staging.copied()
        return DeviceMask(buf[:k].long(), buf[k:].view(k, w))


def apply_bitmask(logits: torch.Tensor, mask: DeviceMask) -> torch.Tensor:
    """A copy of `logits` [S, V] whose rows `mask.rows` keep only their allowed tokens (-inf elsewhere)."""
    k, w = mask.bits.shape
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((mask.bits.unsqueeze(-1) >> shifts) & 1).view(k, w * 32)[:, :logits.shape[1]]
    sub = logits.index_select(0, mask.rows).masked_fill(allowed == 0, float("-inf"))
    return logits.index_copy(0, mask.rows, sub)


def allowed_tokens(mask_row: Any, vocab_size: int) -> list[int]:
    """The ids one host mask row allows (for tests and debugging)."""
    import numpy as np

    bits = np.unpackbits(np.ascontiguousarray(mask_row, dtype=np.int32).view(np.uint8), bitorder="little")
    return np.nonzero(bits[:vocab_size])[0].tolist()
