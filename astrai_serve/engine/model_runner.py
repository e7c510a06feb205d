"""ModelRunner: turns a StepPlan into ONE flattened varlen batch and runs the model on it.

Per step, for S scheduled chunks with N tokens in all:
    input_ids [N], positions [N], slot_mapping [N]        one row per new token
    cu_seqlens_q [S+1], context_lens [S], page_table [S, max_pages]   one row per sequence
The host builds every index in one int64 buffer and ships it with ONE (non-blocking, pinned)
copy; nothing in the step reads back from the device. Only rows that end a chunk reaching the
newest token of its sequence (every decode, and the last prompt token of a finishing prefill)
go through the LM head.
"""
from __future__ import annotations

import torch

from astrai_serve.kernels import PagedAttentionFn

from .paged_attention import PagedAttention, PagedKVCache, StepMetadata
from .scheduler import StepPlan
from .transfer import to_device


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, kernel: PagedAttentionFn,
                 device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.kernel = kernel
        self.device = device
        self.page_size = cache.page_size

    def _build(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, StepMetadata, torch.Tensor]:
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        ctx: list[int] = []
        rows: list[int] = []
        tables: list[list[int]] = []
        for c in plan.chunks:
            seq, end = c.seq, c.start + c.num_tokens
            table = seq.page_table
            ids.extend(seq.token_ids[c.start:end])
            positions.extend(range(c.start, end))
            slots.extend(table[t // ps] * ps + t % ps for t in range(c.start, end))
            cu.append(cu[-1] + c.num_tokens)
            ctx.append(end)
            tables.append(table[:(end + ps - 1) // ps])
            if c.samples:
                rows.append(cu[-1] - 1)
        n, s = len(ids), len(ctx)
        width = max(len(t) for t in tables)
        flat_tables = [p for t in tables for p in t + [0] * (width - len(t))]
        buf = to_device(ids + positions + slots + cu + ctx + rows + flat_tables, torch.int64, self.device)
        parts = torch.split(buf, [n, n, n, s + 1, s, len(rows), s * width])
        input_ids, pos, slot_mapping, cu_t, ctx_t, rows_t, table_t = parts
        meta = StepMetadata(slot_mapping=slot_mapping, page_table=table_t.view(s, width).to(torch.int32),
                            cu_seqlens_q=cu_t.to(torch.int32), context_lens=ctx_t.to(torch.int32))
        return input_ids, pos, meta, rows_t

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Logits [len(plan.sampling), vocab] (float32) for the chunks that sample this step."""
        input_ids, positions, meta, rows = self._build(plan)
        hidden = self.model.forward_flat(input_ids, positions, PagedAttention(self.cache, meta, self.kernel))
        return self.model.compute_logits(hidden[rows]).float()
