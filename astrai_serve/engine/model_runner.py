"""ModelRunner: turns a StepPlan into ONE flattened varlen batch and runs the model on it.

Per step, for S scheduled chunks with N tokens in all:
    input_ids [N], positions [N], slot_mapping [N]        one row per new token
    cu_seqlens_q [S+1], context_lens [S], page_table [S, max_pages]   one row per sequence
The host builds every index with numpy into a pinned buffer and ships it with ONE non-blocking
copy; nothing in the step reads back from the device. Only rows that end a chunk reaching the
newest token of its sequence (every decode, and the last prompt token of a finishing prefill)
go through the LM head. A step may also name rows (`taps`) whose hidden states it returns beside
the logits: the prompt positions of requests that score their prompt (prompt_logprobs.py).

Pure-decode steps of at most `graph_max_batch` sequences replay a CUDA graph (cuda_graphs.py)
when graphs are on; everything else runs eagerly.

Cascade attention: when neighbouring sequences of a decode step start with the same pages (a
prompt prefix from the prefix cache: one system prompt behind many requests, or the prompt the
n samples of a GRPO group share), the step passes a cascade plan (kernels/cascade.py) and the
kernel reads those keys once per chunk of up to 8 such sequences instead of once per sequence.
The host plans it by comparing neighbouring page-table rows (numpy).

Page tables are kept on the host between steps (PageTables), one numpy row per running
sequence, so a decode step of 256 sequences touches only the pages added since the last step
instead of rebuilding 256 x max_pages entries in Python.
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np
import torch

from astrai_serve.kernels import PagedAttentionFn
from astrai_serve.kernels.cascade import max_chunk_seqs, plan_cascade
from astrai_train.model.inference_ops import TORCH_OPS, InferenceOps

from .cuda_graphs import DecodeGraphs
from .paged_attention import PagedAttention, PagedKVCache, StepMetadata
from .scheduler import ScheduledChunk, StepPlan
from .transfer import HostStaging


class PageTables:
    """Host copy of the scheduled sequences' page tables: row r of `array` holds one sequence's
    pages (a sequence keeps its row while it is scheduled step after step); row `pad_row` holds
    `pad_page` everywhere, for the padding rows of a CUDA graph.

    Rewriting only the new pages is exact because a sequence's page table only grows while it is
    `published` (the scheduler's state after its prefill finished): publishing may swap pages
    for the prefix cache's copies in place, and preemption empties the table, but both happen
    only while `published` is False or right after the step that set it. So a row is patched
    incrementally only when it was last written while the sequence was already published.
    """

    def __init__(self, max_rows: int, width: int, pad_page: int) -> None:
        self.width = width
        self.pad_row = max_rows
        self.array = np.zeros((max_rows + 1, width), dtype=np.int64)
        self.array[max_rows] = pad_page
        self._free = list(range(max_rows - 1, -1, -1))
        self._rows: dict[int, list] = {}       # seq_id -> [row, pages written, written while published]

    def rows_for(self, chunks: Seq[ScheduledChunk]) -> list[int]:
        """Sync the rows of this step's sequences; rows of sequences not in the step are freed."""
        old, arr = self._rows, self.array
        entries = [old.pop(c.seq.seq_id, None) for c in chunks]
        for e in old.values():
            self._free.append(e[0])
        new: dict[int, list] = {}
        rows = []
        for c, e in zip(chunks, entries):
            seq = c.seq
            table, published = seq.page_table, seq.published
            n = len(table)
            if n > self.width:
                raise RuntimeError(f"sequence {seq.seq_id} holds {n} pages, more than max_model_len allows "
                                   f"({self.width})")
            if e is None:
                e = [self._free.pop(), 0, False]
            if e[2] and published:
                if n > e[1]:
                    arr[e[0], e[1]:n] = table[e[1]:]
            else:
                arr[e[0], :n] = table
            e[1], e[2] = n, published
            new[seq.seq_id] = e
            rows.append(e[0])
        self._rows = new
        return rows


# Cascade pays once the key reads it saves (shared tokens x (sequences in its chunk - 1), per
# layer and kv head) outweigh its extra launch per layer: ~4 µs, the time to read ~16 MB, ~4k
# tokens of qwen3-0.6b's K/V over 28 layers. 8,192 saved tokens is twice that break-even.
# And only for long prefixes: plain decode reads a prefix its neighbours share mostly from L2,
# so a short one saves little, while the prefix kernel and the merge of its partial results cost
# the same. bench/paged_attention.py --sections cascade, H200, one layer of 256 sequences:
# GRPO groups (8 samples behind 64-256-token prompts) 85 µs plain, 111 µs cascade; W2 (a
# 2,000-token system prompt) 323 µs plain, 141 µs cascade (kernels/NOTES.md).
CASCADE_MIN_SEQS = 8
CASCADE_MIN_SAVED_TOKENS = 8192
CASCADE_MIN_SHARED_TOKENS = 1024     # mean prefix per sequence that skips it


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, kernel: PagedAttentionFn,
                 device: torch.device, max_num_seqs: int, max_model_len: int, pad_page: int | None = None,
                 graph_max_batch: int = 0, graph_budget_s: float = 60.0, compile_graphs: bool = False,
                 cascade: bool = True, decode_ops: InferenceOps | None = None,
                 ops: InferenceOps = TORCH_OPS) -> None:
        """pad_page: a cache page outside the page pool, for padding rows (needed with graphs);
        graph_max_batch > 0 captures decode graphs up to that batch size (compiled first with
        compile_graphs); cascade: use cascade attention for decode steps that share a prefix;
        ops: the forward's kernels besides attention (kernels/fused_ops.py on a GPU),
        decode_ops: those of graphs of at most 4 sequences (the decode GEMV)."""
        self.cascade_min_seqs = CASCADE_MIN_SEQS if cascade else None
        self.cascade_min_saved = CASCADE_MIN_SAVED_TOKENS
        self.cascade_min_shared = CASCADE_MIN_SHARED_TOKENS
        self.cascade_max_seqs = max_chunk_seqs(model.config.n_heads // cache.layout.n_kv, cache.layout.k_dim)
        self.model = model
        self.ops = ops
        self.cache = cache
        self.kernel = kernel
        self.device = device
        self.page_size = cache.page_size
        width = -(-max_model_len // cache.page_size)
        self.tables = PageTables(max_num_seqs, width, 0 if pad_page is None else pad_page)
        self._staging = HostStaging(device, torch.int64)
        self.graphs: DecodeGraphs | None = None
        if graph_max_batch > 0:
            if pad_page is None:
                raise ValueError("CUDA graphs need a reserved padding page")
            self.graphs = DecodeGraphs(model, cache, kernel, graph_max_batch, width, pad_page, compile_graphs,
                                       cascade_min_batch=self.cascade_min_seqs, ops=decode_ops, large_ops=ops)
            self.graphs.capture(graph_budget_s)

    def _indices(self, plan: StepPlan, fed: bool = False) -> dict[str, np.ndarray | int]:
        """Every index of the step as numpy arrays (see the module docstring for the layout);
        fed: a decode whose input ids come from the device (zeros here)."""
        chunks, ps = plan.chunks, self.page_size
        s = len(chunks)
        rows = np.asarray(self.tables.rows_for(chunks), dtype=np.int64)
        starts = np.fromiter((c.start for c in chunks), np.int64, s)
        counts = [c.num_tokens for c in chunks]
        n = sum(counts)
        if fed and n != s:
            raise ValueError("only a decode step (one token per sequence) can take its ids from the device")
        if n == s:                                   # every chunk is one token (a decode)
            ids = (np.zeros(s, dtype=np.int64) if fed
                   else np.fromiter((c.seq.token_ids[c.start] for c in chunks), np.int64, s))
            positions, token_rows = starts, rows
            cu = np.arange(s + 1, dtype=np.int64)
            ctx = starts + 1
        else:
            ns = np.asarray(counts, dtype=np.int64)
            cu = np.zeros(s + 1, dtype=np.int64)
            np.cumsum(ns, out=cu[1:])
            flat: list[int] = []
            for c in chunks:
                flat += c.seq.token_ids[c.start:c.start + c.num_tokens]
            ids = np.asarray(flat, dtype=np.int64)
            positions = np.arange(n, dtype=np.int64) + np.repeat(starts - cu[:-1], ns)
            token_rows = np.repeat(rows, ns)
            ctx = starts + ns
        slots = self.tables.array[token_rows, positions // ps] * ps + positions % ps
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        sample_rows = cu[1:][sampling] - 1 if len(sampling) < s else cu[1:] - 1
        width = int(ctx.max() + ps - 1) // ps
        cascade = None                               # None: no cascade this step
        if n == s and self.cascade_min_seqs is not None and s >= self.cascade_min_seqs:
            plan, saved = plan_cascade(self.tables.array[rows, :width], ctx, ps, self.cascade_max_seqs)
            chunks = (len(plan) - s) // 3
            skipping = int(plan[s + chunks:s + 2 * chunks].sum()) - chunks   # sequences that skip a prefix
            if saved >= self.cascade_min_saved and saved >= self.cascade_min_shared * skipping:
                cascade = plan
        return dict(ids=ids, positions=positions, slots=slots, cu=cu, ctx=ctx, rows=rows,
                    sample_rows=sample_rows, width=width, all_sample=len(sampling) == s, cascade=cascade)

    def uses_graph(self, plan: StepPlan) -> bool:
        """Whether `execute(plan)` replays a CUDA graph: a pure decode that fits the largest one."""
        g = self.graphs     # the largest size (max_batch) is always captured: capture starts there
        return (g is not None and 0 < len(plan.chunks) <= g.max_batch
                and all(c.num_tokens == 1 and c.samples for c in plan.chunks))

    @torch.inference_mode()
    def execute(self, plan: StepPlan, fed: torch.Tensor | None = None, taps: np.ndarray | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [len(plan.sampling), vocab] in the model's dtype for the chunks that sample this
        step, the final hidden states [len(taps), dim] of the batch rows `taps` or None).

        fed (a decode only): the input ids as an int64 device tensor, one per chunk, e.g. the
        previous step's sampled ids before they have reached the host. taps: flat batch rows
        (chunks in plan order, each chunk's tokens in order); a step with taps runs eagerly."""
        idx = self._indices(plan, fed is not None)
        if taps is None and self.uses_graph(plan):
            return self.graphs.run(idx["ids"], idx["positions"], idx["slots"], self.tables.array, idx["rows"],
                                   self.tables.pad_row, idx["width"], idx["cascade"], fed), None
        return self._eager(idx, fed, taps)

    def _eager(self, idx: dict, fed: torch.Tensor | None = None, taps: np.ndarray | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids, sample_rows, rows = idx["ids"], idx["sample_rows"], idx["rows"]
        n, s, r, w = len(ids), len(rows), len(sample_rows), idx["width"]
        t = 0 if taps is None else len(taps)
        # int64 part first (ids, positions, slots, sampled rows, tapped rows), then the int32 part
        # in one run (cu_seqlens, context lens, page table), so one copy in and one cast make all of it.
        plan = idx["cascade"]
        parts = [ids, idx["positions"], idx["slots"], sample_rows] + ([taps] if t else []) + [
                 idx["cu"], idx["ctx"], self.tables.array[rows, :w].reshape(-1)] + ([plan] if plan is not None else [])
        n_plan = 0 if plan is None else len(plan)
        wide = 3 * n + r + t
        total = wide + (s + 1) + s + s * w + n_plan
        host_t, host = self._staging.take(total)
        np.concatenate(parts, out=host)
        if self.device.type == "cpu":
            buf = host_t.clone()                      # the staging buffer is reused next step
        else:
            buf = host_t.to(self.device, non_blocking=True)
            self._staging.copied()
        input_ids, positions, slots, rows_t, taps_t = torch.split(buf[:wide], [n, n, n, r, t])
        if fed is not None:
            input_ids = fed
        cu_t, ctx_t, table_t, plan_t = torch.split(buf[wide:].to(torch.int32), [s + 1, s, s * w, n_plan])
        meta = StepMetadata(slot_mapping=slots, page_table=table_t.view(s, w), cu_seqlens_q=cu_t,
                            context_lens=ctx_t, cascade=plan_t if plan is not None else None)
        if self.graphs is not None:
            hidden = self.graphs.forward_eager(input_ids, positions, meta)
        else:
            hidden = self.model.forward_flat(input_ids, positions, PagedAttention(self.cache, meta, self.kernel),
                                             self.ops)
        tapped = hidden[taps_t] if t else None
        if not (idx["all_sample"] and n == s):        # keep only the rows that sample
            hidden = hidden[rows_t]
        return self.model.compute_logits(hidden), tapped   # the sampler widens what it must (sampler.py)
