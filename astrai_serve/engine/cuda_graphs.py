"""CUDA graphs for pure-decode steps: one graph per batch size on a ladder, replayed with padding.

Why: a decode step of a small model is hundreds of tiny kernels; launched eagerly from Python the
GPU waits on the launches (a 125m model spends ~90% of its eager decode step launching). A graph
replays the whole forward, LM head included, with one launch.

How:
- Static inputs live in device buffers that every step copies into (non_blocking, from pinned
  memory): the cascade plan, token ids, positions and cache slots in ONE int64 buffer laid out
  [plan | ids | positions | slots] for the graph's batch size b (the plan with a slot for every
  possible chunk, kernels/cascade.py), and a page table of fixed width (the pages of the longest
  sequence, max_model_len). Context lengths are computed inside the graph (position + 1: every
  row is a decode), and cu_seqlens is a constant arange.
- A batch of n sequences runs in the graph of the smallest captured size b >= n. The b - n padding
  rows decode token 0 at position 0 into a page reserved for them (never handed out by the page
  pool), so they write nothing anyone reads; their logits are computed and ignored.
- The logits of every graph land in one shared buffer [max_batch, vocab] in the model's dtype:
  above the GEMV's batch sizes the LM head's matmul writes straight into it (no copy of a
  [256, 151,936] tensor), and the sampler reads bf16 as it is (it computes in fp32 inside).
- Graphs share one memory pool and are captured largest first, so the smaller ones reuse the
  blocks the largest one freed. Capture stops at a time budget; batch sizes not reached (the
  smallest) pad up to the smallest captured size.
- Sizes from `cascade_min_batch` up are captured twice, with and without cascade attention
  (prefixes that neighbouring sequences hold in the same pages read once per chunk, see
  model_runner.py); a step picks by whether it has a plan.
Mixed prefill/decode and prefill steps stay eager (their shapes vary with every step), through
the same forward as the graphs: compiled with compile_decode (`forward_eager`).

With `ops` given (EngineConfig.decode_gemv: kernels/decode_matmul.py's DecodeOps), graphs of at
most 4 sequences run their projections, LM head, SwiGLU activation and QK-norm + rotary through
it: Triton GEMVs instead of cuBLAS, with launches merged where a batch-1 step is launch-bound.

With `compile=True` the captured forward is first run through torch.compile (the attention call
left opaque): its RMSNorms, rotary embeddings and SwiGLU become a few fused kernels instead of
~60 small ones per layer, which is most of a graph replay's time at small contexts. The attention
is hidden behind a graph break, not a custom op, on purpose: the break makes each layer's frames
compile once for all layers, where one unbroken graph of qwen3-0.6b's 28 layers took ~20x as
long to compile (measured on a CPU: 115 s against 5 s).

Measured before async scheduling (H200, qwen3-0.6b bf16, W1: 256 requests, 100-1024 in/out):
eager 6,651 output tok/s; graphs 13,051 (serial steps) / 14,444 (overlapped steps); graphs of the
compiled forward 17,240 / 19,634. A replay at context 1 costs 4.1 ms (batch 1) to 6.1 ms (256)
uncompiled: the floor of ~1,600 small kernels, which compile_decode fuses.

On the CPU (tests only: EngineConfig refuses graphs there) "capturing" keeps the forward and a
replay runs it eagerly over the same static buffers, which exercises the padding and layout.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from astrai_serve.kernels import PagedAttentionFn
from astrai_serve.kernels.cascade import graph_plan_len, pad_plan
from astrai_serve.kernels.decode_matmul import MAX_ROWS
from astrai_train.model.inference_ops import TORCH_OPS, InferenceOps

from .paged_attention import PagedAttention, PagedKVCache, StepMetadata
from .transfer import HostStaging

log = logging.getLogger("astrai.serve.engine")


_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # then steps of 32


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: the ladder up to max_batch, then steps of 32, then max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"cuda_graph_max_batch={max_batch} must be >= 1")
    sizes = [b for b in _LADDER if b < max_batch]
    b = _LADDER[-1] + 32
    while b < max_batch:
        sizes.append(b)
        b += 32
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, kernel: PagedAttentionFn,
                 max_batch: int, max_pages: int, pad_page: int, compile: bool = False,
                 cascade_min_batch: int | None = None, ops: InferenceOps | None = None,
                 large_ops: InferenceOps = TORCH_OPS) -> None:
        device = cache.k.device
        self.model, self.cache, self.kernel = model, cache, kernel
        self.compiled = compile
        self._flat = torch.compile(model.forward_flat, dynamic=True) if compile else model.forward_flat
        self._attention = _OpaqueAttention if compile else PagedAttention
        self.device = device
        self.max_batch = max_batch
        self.width = max_pages
        self.pad_page = pad_page
        self.pad_slot = pad_page * cache.page_size
        self.cascade_min_batch = cascade_min_batch
        self.small_ops = ops                # for graphs of at most MAX_ROWS rows (None: large_ops)
        self.ops = large_ops                # for larger graphs and the eager steps (cuBLAS matmuls)
        with torch.inference_mode():
            vocab = model.compute_logits(torch.zeros(1, model.config.dim, device=device,
                                                     dtype=model.lm_weight.dtype)).shape[-1]
        # [plan | ids | positions | slots], each graph's own layout for its batch size
        self.meta = torch.zeros(graph_plan_len(max_batch) + 3 * max_batch, dtype=torch.int64, device=device)
        self.page_table = torch.full((max_batch, max_pages), pad_page, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.logits = torch.zeros(max_batch, vocab, dtype=model.lm_weight.dtype, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph | _EagerReplay] = {}  # (size, cascade)
        self.sizes: list[int] = []          # captured sizes, ascending
        self.capture_seconds = 0.0
        self._meta_host = HostStaging(device, torch.int64)
        self._table_host = HostStaging(device, torch.int32)

    # ---- capture -----------------------------------------------------------------------------
    def _fill_padding(self, b: int) -> None:
        """Every row a padding row: token 0 at position 0, written to the reserved page; no plan."""
        p = graph_plan_len(b)
        self.meta[:p + 2 * b].zero_()
        self.meta[p + 2 * b:p + 3 * b].fill_(self.pad_slot)
        self.page_table[:b].fill_(self.pad_page)

    def forward_eager(self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """Hidden states of a step run outside the graphs (prefill or mixed), through the same
        forward the graphs captured: compiled with compile_decode. A mixed step (a new request's
        prefill beside the running decodes) is most steps under steady arrivals (W4), and the
        uncompiled forward spends ~1,600 small kernels on it."""
        return self._flat(ids, positions, self._attention(self.cache, meta, self.kernel), self.ops)

    def _warm_eager(self) -> None:
        """Run forward_eager once on a small mixed step (a 3-token prefill and a decode, on the
        padding page) so that the prefill kernels JIT-compile (1-2 s each for Triton on an
        H200) and torch.compile specialises for such steps at startup, not mid-serving."""
        dev, page = self.device, self.cache.page_size
        n = min(3, page)
        positions = torch.tensor(list(range(n)) + [0], dtype=torch.int64, device=dev)
        meta = StepMetadata(slot_mapping=torch.full((n + 1,), self.pad_slot, dtype=torch.int64, device=dev),
                            page_table=torch.full((2, 1), self.pad_page, dtype=torch.int32, device=dev),
                            cu_seqlens_q=torch.tensor([0, n, n + 1], dtype=torch.int32, device=dev),
                            context_lens=torch.tensor([n, 1], dtype=torch.int32, device=dev))
        self.forward_eager(torch.zeros(n + 1, dtype=torch.int64, device=dev), positions, meta)

    def _forward(self, b: int, cascade: bool = False) -> None:
        p = graph_plan_len(b)
        ids, positions, slots = self.meta[p:p + b], self.meta[p + b:p + 2 * b], self.meta[p + 2 * b:p + 3 * b]
        context_lens = self.context_lens[:b]
        context_lens.copy_(positions + 1)
        meta = StepMetadata(slot_mapping=slots, page_table=self.page_table[:b],
                            cu_seqlens_q=self.cu_seqlens[:b + 1], context_lens=context_lens,
                            cascade=self.meta[:p] if cascade else None)
        ops = self.small_ops if self.small_ops is not None and b <= MAX_ROWS else self.ops
        hidden = self._flat(ids, positions, self._attention(self.cache, meta, self.kernel), ops)
        out = self.logits[:b]
        if ops is self.ops:         # the LM head's matmul (cuBLAS) writes the shared buffer itself
            logits = self.model.compute_logits(hidden, lambda x, w: torch.mm(x, w.t(), out=out))
        else:                       # the GEMV's [<= 4, vocab] result is copied
            logits = self.model.compute_logits(hidden, ops.linear)
        if logits.data_ptr() != out.data_ptr():   # (also a head that does more than one matmul)
            out.copy_(logits)

    @torch.inference_mode()
    def capture(self, budget_s: float) -> None:
        """Capture the ladder, largest first, until budget_s seconds have passed (>= 1 graph)."""
        start = time.perf_counter()
        cuda = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if cuda else None
        stream = torch.cuda.Stream(self.device) if cuda else None
        wanted = graph_batch_sizes(self.max_batch)
        for b in reversed(wanted):
            if self.graphs and time.perf_counter() - start > budget_s:
                break
            for cascade in (False, True) if self.takes_cascade(b) else (False,):
                self._fill_padding(b)
                self.graphs[b, cascade] = (self._capture_one(b, cascade, pool, stream) if cuda
                                           else _EagerReplay(self, b, cascade))
        self._warm_eager()      # the prefill kernels compile now, not in the first mixed step
        if cuda:
            torch.cuda.synchronize(self.device)
        self.sizes = sorted({b for b, _ in self.graphs})
        self.capture_seconds = time.perf_counter() - start
        skipped = [b for b in wanted if b not in self.graphs]
        log.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s%s", len(self.sizes),
                 ",".join(map(str, self.sizes)), self.capture_seconds,
                 f"; out of time for {skipped} (they pad up to {self.sizes[0]})" if skipped else "")

    def takes_cascade(self, b: int) -> bool:
        """Whether batch size b has a cascade-attention graph."""
        return self.cascade_min_batch is not None and b >= self.cascade_min_batch

    def _capture_one(self, b: int, cascade: bool, pool: object, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
        # Warm-up outside the capture: Triton compiles this shape's kernels, cuBLAS picks its
        # algorithms, the allocator sizes its blocks. Nothing may run for the first time in a capture.
        current = torch.cuda.current_stream(self.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            self._forward(b, cascade)
        current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            self._forward(b, cascade)
        return graph

    # ---- replay ------------------------------------------------------------------------------
    def padded_size(self, n: int) -> int | None:
        """The captured batch size a batch of n sequences runs in (None: too large, run eagerly)."""
        for b in self.sizes:
            if b >= n:
                return b
        return None

    def run(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
            rows: np.ndarray, pad_row: int, width: int, cascade: np.ndarray | None = None,
            fed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n, vocab] (the model's dtype) for a decode batch of n = len(ids) sequences.

        `tables[rows[i], :width]` is the page table of row i; `tables[pad_row]` is the padding
        row (the reserved page everywhere); a cascade plan for the n sequences runs the cascade
        graph (where the padded size has one); `fed` (int64 [n] on the device) replaces `ids` after
        the copy from the host. The result is a view of the shared logits buffer:
        valid until the next replay.
        """
        n = len(ids)
        b = self.padded_size(n)
        if b is None:
            raise ValueError(f"decode batch of {n} exceeds the largest captured graph ({self.sizes[-1]})")
        if width > self.width:
            raise ValueError(f"page table of {width} pages exceeds the graph's width {self.width}")
        use_cascade = cascade is not None and self.takes_cascade(b)
        p = graph_plan_len(b)
        meta_t, meta = self._meta_host.take(p + 3 * b)
        meta[:p] = pad_plan(cascade if use_cascade else None, n, b)
        body = meta[p:]
        body[:n], body[n:b] = ids, 0
        body[b:b + n], body[b + n:2 * b] = positions, 0
        body[2 * b:2 * b + n], body[2 * b + n:] = slots, self.pad_slot
        table_t, table = self._table_host.take(b * width)
        table = table.reshape(b, width)
        table[:n] = tables[rows, :width]
        table[n:] = tables[pad_row, :width]
        self.meta[:p + 3 * b].copy_(meta_t, non_blocking=True)
        if fed is not None:
            self.meta[p:p + n].copy_(fed)
        self.page_table[:b, :width].copy_(table_t.view(b, width), non_blocking=True)
        self._meta_host.copied()
        self._table_host.copied()
        self.graphs[b, use_cascade].replay()
        return self.logits[:n]


class _EagerReplay:
    """The CPU stand-in for a captured graph: replay runs the forward over the static buffers."""

    def __init__(self, graphs: DecodeGraphs, b: int, cascade: bool) -> None:
        self.graphs, self.b, self.cascade = graphs, b, cascade

    @torch.inference_mode()
    def replay(self) -> None:
        self.graphs._forward(self.b, self.cascade)


class _OpaqueAttention(PagedAttention):
    """PagedAttention that torch.compile calls as it is (its Triton kernel and cache writes are
    not for the compiler to trace): the graph breaks there, the rest of each layer is fused
    (Block.forward_flat keeps each residual add beside the RMSNorm that follows it for that)."""

    attend = torch.compiler.disable(PagedAttention.attend)
