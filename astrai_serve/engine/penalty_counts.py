"""Token counts for repetition/presence/frequency penalties, kept on the device between steps.

Why: the penalties need, per row, how often each token occurred in the output and whether it
occurred in the prompt. Rebuilding that from the token lists every step costs O(tokens so far)
of host work per sequence per step (256 streams of 1,000 tokens: a quarter of a million list
items a step). Here each sequence with penalties owns a row of two device buffers, filled from
its history once and then advanced by the few tokens it gained since the last step, all rows
in one scatter.

The engine keys rows by sequence id and calls `release` when a sequence finishes.
"""
from __future__ import annotations

import torch

from .transfer import to_device


class PenaltyCounts:
    def __init__(self, vocab: int, device: torch.device, capacity: int = 16) -> None:
        self.vocab, self.device = vocab, device
        self.output = torch.zeros(capacity, vocab, dtype=torch.float32, device=device)  # output token counts
        self.prompt = torch.zeros(capacity, vocab, dtype=torch.bool, device=device)     # token in the prompt
        self._rows: dict[int, list[int]] = {}      # key -> [row, output tokens counted so far]
        self._free = list(range(capacity - 1, -1, -1))

    def gather(self, keys: list[int], histories: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(output counts [n, vocab] float32, prompt presence [n, vocab] bool) for these sequences,
        brought up to date with their histories (token_ids, num_prompt_tokens)."""
        rows, new_rows, new_cols, fresh_rows, fresh_cols = [], [], [], [], []
        for key, (ids, n_prompt) in zip(keys, histories):
            entry = self._rows.get(key)
            if entry is None:
                entry = self._rows[key] = [self._take(), 0]
                row = entry[0]
                fresh_rows.extend([row] * n_prompt)
                fresh_cols.extend(ids[:n_prompt])
            row, counted = entry
            new = ids[n_prompt + counted:]
            new_rows.extend([row] * len(new))
            new_cols.extend(new)
            entry[1] = len(ids) - n_prompt
            rows.append(row)
        if fresh_rows:
            # values made on the device: `prompt[i, j] = True` would copy a CPU scalar, a host sync
            index = (to_device(fresh_rows, torch.int64, self.device), to_device(fresh_cols, torch.int64, self.device))
            self.prompt.index_put_(index, torch.ones(len(fresh_rows), dtype=torch.bool, device=self.device))
        if new_rows:
            index = (to_device(new_rows, torch.int64, self.device), to_device(new_cols, torch.int64, self.device))
            self.output.index_put_(index, torch.ones(len(new_rows), device=self.device), accumulate=True)
        r = to_device(rows, torch.int64, self.device)
        return self.output[r], self.prompt[r]

    def release(self, key: int) -> None:
        entry = self._rows.pop(key, None)
        if entry is not None:
            self._free.append(entry[0])

    def _take(self) -> int:
        if not self._free:   # more live sequences with penalties than rows: double the buffers
            old = self.output.shape[0]
            self.output = torch.cat([self.output, torch.zeros_like(self.output)])
            self.prompt = torch.cat([self.prompt, torch.zeros_like(self.prompt)])
            self._free = list(range(2 * old - 1, old - 1, -1))
        row = self._free.pop()
        self.output[row].zero_()
        self.prompt[row].zero_()
        return row

    @property
    def num_rows(self) -> int:
        return len(self._rows)
