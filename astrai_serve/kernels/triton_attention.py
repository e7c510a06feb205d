"""Paged attention in Triton: one flash-attention kernel for decode and prefill, plus a split-K reduce.

Same contract as `reference.paged_attention` (read its docstring). One kernel serves both cases:

- A program owns one kv head of one "tile" of query rows. The rows of a tile are
  (token, head-in-group) pairs packed into the M dimension of the matmuls, so the query heads
  that share a kv head (GQA, or all heads for MLA) share every K/V load. A tile holds
  `BLOCK_M // group` query tokens of one sequence.
- The program walks its sequence's context in BLOCK_N-token steps; each key's page comes from the
  page table (so BLOCK_N need not equal the page size), and the causal limit of each row is its
  own position `context_len - q_len + i`.
- Decode (every sequence has one query, N == S): one tile per sequence, and when sequences x kv
  heads are too few to fill the GPU the context is split into NUM_SPLITS chunks (flash-decoding)
  whose partial outputs and log-sum-exps a second kernel merges. The split count depends on
  shapes only and each chunk's length on the device-side context length, so a step launches the
  same grid whatever the lengths are: no host sync, and CUDA-graph capturable.
- Prefill / mixed batches (N > S): tiles are enumerated on the device (a cumsum and a
  searchsorted over tokens-per-tile), under a grid bound taken from shapes; surplus programs find
  no rows and exit without work.
- MLA (value_in_key): the key is [latent, rope]; the latent part is loaded once and used both
  as key (with the rope part) and as value, which is the point of MLA's absorbed form.

Softmax runs in base 2 (scale folded with log2 e) in fp32; matmul operands stay bf16/fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from astrai_serve.kernels.cascade import prefix_block_rows
from astrai_serve.kernels.reference import check_paged_args

LOG2E = 1.4426950408889634


@triton.jit
def _attend_range(
    acc, l_i, m_i, q1, q2, K, V, pt_row, pos, kvh, lo, hi, kv_hi, scale_log2,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    PAGE: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr, DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    VALUE_IN_KEY: tl.constexpr, MASKED: tl.constexpr,
):
    """Online softmax over keys [lo, hi); MASKED applies the causal limit `pos` and `kv_hi`."""
    d1 = tl.arange(0, BLOCK_D1)
    d2 = tl.arange(0, BLOCK_D2)
    dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_hi
        if MASKED:
            page = tl.load(pt_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
            rows_ok = n_ok[:, None]
        else:                               # every key of the block exists: no row mask on loads
            page = tl.load(pt_row + offs_n // PAGE).to(tl.int64)
            rows_ok = tl.full([BLOCK_N, 1], 1, tl.int1)
        slot = offs_n % PAGE
        k_off = page * stride_kp + slot * stride_ks + kvh * stride_kh
        # (an fp8 cache widens to the query's dtype here: exact, and the matmuls stay 16-bit)
        k1 = tl.load(K + k_off[:, None] + d1[None, :], mask=rows_ok & (d1 < KD1)[None, :], other=0.0).to(q1.dtype)
        qk = tl.dot(q1, tl.trans(k1))
        if KD2 > 0:
            k2 = tl.load(K + k_off[:, None] + KD1 + d2[None, :],
                         mask=rows_ok & (d2 < KD2)[None, :], other=0.0).to(q1.dtype)
            qk += tl.dot(q2, tl.trans(k2))
        if MASKED:
            visible = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
            qk = tl.where(visible, qk * scale_log2, float("-inf"))
        else:
            qk = qk * scale_log2
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if VALUE_IN_KEY:
            v = k1                                               # the latent is the value
        else:
            v_off = page * stride_vp + slot * stride_vs + kvh * stride_vh
            v = tl.load(V + v_off[:, None] + dv[None, :], mask=rows_ok & (dv < DV)[None, :],
                        other=0.0).to(q1.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


# Batch-dependent integers and the int32 metadata pointers (views into one packed per-step copy,
# so their 16-byte alignment changes with the batch) are not specialised on: each distinct
# specialisation is a JIT compile of 1-2 s on an H200, and without this a cold server compiled
# prefill variants mid-serving (W4's TTFT of seconds). One compile per kernel shape now, made at
# startup (cuda_graphs.DecodeGraphs._warm_eager). These are scalar loads: alignment buys nothing.
_METADATA = ["PageTable", "CuQ", "CtxLens", "TileSeq", "TileBlk", "Cascade"]


@triton.jit(do_not_specialize=["n_seqs", "stride_pt"], do_not_specialize_on_alignment=_METADATA)
def _paged_attn_kernel(
    Q, K, V, Out, PartOut, PartLse, PageTable, CuQ, CtxLens, TileSeq, TileBlk, Cascade,
    scale_log2, n_seqs,
    stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_on, stride_oh, stride_pn, stride_ph, stride_ps, stride_ln, stride_lh, stride_pt,
    G: tl.constexpr, PAGE: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr, DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TPT: tl.constexpr,
    VALUE_IN_KEY: tl.constexpr, DECODE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT_MASK: tl.constexpr, SHARED: tl.constexpr, SPLIT_BASE: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = tile
        qblk = 0
    else:
        seq = tl.load(TileSeq + tile)
        qblk = tl.load(TileBlk + tile)
    live = seq < n_seqs                     # surplus prefill programs: no rows, no keys
    seq = tl.minimum(seq, n_seqs - 1)
    q_start = tl.load(CuQ + seq)
    q_len = tl.where(live, tl.load(CuQ + seq + 1) - q_start, 0)
    ctx = tl.load(CtxLens + seq)

    offs_m = tl.arange(0, BLOCK_M)
    tok = qblk * TPT + offs_m // G          # query index within the sequence
    head = kvh * G + offs_m % G
    row_ok = (offs_m < TPT * G) & (tok < q_len)
    pos = ctx - q_len + tok                 # each row's own position: its causal limit
    n_tok = tl.minimum(q_len - qblk * TPT, TPT)
    kv_hi = tl.where(n_tok > 0, ctx - q_len + qblk * TPT + n_tok, 0)
    # SHARED (decode only): keys [0, shared) are a prefix this sequence holds in the same pages
    # as the rest of its cascade chunk; _shared_prefix_kernel attends to them once for the whole
    # chunk, this kernel to the rest (Cascade[seq] = shared, see kernels/cascade.py).
    kv_base = tl.load(Cascade + seq).to(tl.int32) if SHARED else 0
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(kv_hi - kv_base, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = kv_base + split * chunk
        kv_hi = tl.minimum(kv_lo + chunk, kv_hi)
    else:
        kv_lo = kv_base

    d1 = tl.arange(0, BLOCK_D1)
    q_rows = Q + (q_start + tok).to(tl.int64)[:, None] * stride_qn + head[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :], mask=row_ok[:, None] & (d1 < KD1)[None, :], other=0.0)
    q2 = q1                                 # placeholder: only read when KD2 > 0
    if KD2 > 0:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + KD1 + d2[None, :], mask=row_ok[:, None] & (d2 < KD2)[None, :],
                     other=0.0)
    dv = tl.arange(0, BLOCK_DV)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    pt_row = PageTable + seq.to(tl.int64) * stride_pt
    # Keys below the tile's first position are visible to every row: no causal or length mask
    # there. Only the blocks from there to kv_hi (the diagonal; for decode, the last block) pay
    # for masking. Both bounds are multiples of BLOCK_N, so the two ranges tile [kv_lo, kv_hi).
    if SPLIT_MASK:
        # whole blocks from kv_lo (a multiple of the page size, not always of BLOCK_N)
        first_pos = ctx - q_len + qblk * TPT
        full_hi = kv_lo + tl.maximum(tl.minimum(first_pos + 1, kv_hi) - kv_lo, 0) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend_range(
            acc, l_i, m_i, q1, q2, K, V, pt_row, pos, kvh, kv_lo, full_hi, kv_hi, scale_log2,
            stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
            PAGE, KD1, KD2, DV, BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, VALUE_IN_KEY, False)
    else:
        full_hi = kv_lo
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q1, q2, K, V, pt_row, pos, kvh, full_hi, kv_hi, kv_hi, scale_log2,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        PAGE, KD1, KD2, DV, BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, VALUE_IN_KEY, True)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    out_mask = row_ok[:, None] & (dv < DV)[None, :]
    rows = (q_start + tok).to(tl.int64)
    if SHARED:
        # A sequence in no chunk gets nothing from the prefix kernel: mark its slots empty.
        # (a row-shaped flag: kv_base and split are both >= 0, so their sum is 0 iff both are)
        no_prefix = row_ok & ((offs_m * 0 + kv_base + split) == 0)
        for s in tl.static_range(SPLIT_BASE):
            tl.store(PartLse + rows * stride_ln + head * stride_lh + s, float("-inf"), mask=no_prefix)
    if NUM_SPLITS > 1 or SHARED:
        slot = SPLIT_BASE + split
        p_ptr = PartOut + rows[:, None] * stride_pn + head[:, None] * stride_ph + slot * stride_ps
        tl.store(p_ptr + dv[None, :], o, mask=out_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(PartLse + rows * stride_ln + head * stride_lh + slot, lse, mask=row_ok)
    else:
        o_ptr = Out + rows[:, None] * stride_on + head[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptr, o.to(Out.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["n_seqs", "n_chunks", "stride_pt"],
            do_not_specialize_on_alignment=["PageTable", "Cascade"])
def _shared_prefix_kernel(
    Q, K, V, PartOut, PartLse, PageTable, Cascade, scale_log2, n_seqs, n_chunks,
    stride_qn, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_pn, stride_ph, stride_ps, stride_ln, stride_lh, stride_pt,
    G: tl.constexpr, PAGE: tl.constexpr, KD1: tl.constexpr, KD2: tl.constexpr, DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VALUE_IN_KEY: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Cascade decode, part 1: the keys [0, shared) that the sequences of one cascade chunk hold
    in the same pages (kernels/cascade.py: a system prompt, or a GRPO group's prompt).

    A program owns the query rows (sequence, head-in-group) of one chunk for one kv head ACROSS
    sequences, so each shared key is loaded once per chunk instead of once per sequence: with 256
    sequences behind one 2,000-token system prompt this turns the decode's biggest read into a
    small matmul. Every row sees every shared key (each sequence's own tokens come after them),
    so only the ragged last block is masked. Partial outputs go to split slots [0, NUM_SPLITS).
    An unused chunk slot (count 0) has no rows and writes nothing.
    """
    chunk_id = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    first = tl.load(Cascade + n_seqs + chunk_id).to(tl.int32)
    count = tl.load(Cascade + n_seqs + n_chunks + chunk_id).to(tl.int32)
    shared = tl.load(Cascade + n_seqs + 2 * n_chunks + chunk_id).to(tl.int32)
    offs_m = tl.arange(0, BLOCK_M)
    row_ok = offs_m < count * G
    seq = (first + offs_m // G).to(tl.int64)   # decode: sequence s is query row s
    head = kvh * G + offs_m % G
    chunk = tl.cdiv(tl.cdiv(shared, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, shared)
    full_hi = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N

    d1 = tl.arange(0, BLOCK_D1)
    q_rows = Q + seq[:, None] * stride_qn + head[:, None] * stride_qh
    q1 = tl.load(q_rows + d1[None, :], mask=row_ok[:, None] & (d1 < KD1)[None, :], other=0.0)
    q2 = q1
    if KD2 > 0:
        d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_rows + KD1 + d2[None, :], mask=row_ok[:, None] & (d2 < KD2)[None, :],
                     other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    pos = tl.full([BLOCK_M], 0, tl.int32) + shared      # every shared key is visible
    pt_row = PageTable + first.to(tl.int64) * stride_pt  # the chunk's pages: its first sequence's
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q1, q2, K, V, pt_row, pos, kvh, lo, full_hi, hi, scale_log2,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        PAGE, KD1, KD2, DV, BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, VALUE_IN_KEY, False)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q1, q2, K, V, pt_row, pos, kvh, full_hi, hi, hi, scale_log2,
        stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
        PAGE, KD1, KD2, DV, BLOCK_D1, BLOCK_D2, BLOCK_DV, BLOCK_N, VALUE_IN_KEY, True)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    dv = tl.arange(0, BLOCK_DV)
    p_ptr = PartOut + seq[:, None] * stride_pn + head[:, None] * stride_ph + split * stride_ps
    tl.store(p_ptr + dv[None, :], acc / l_safe[:, None], mask=row_ok[:, None] & (dv < DV)[None, :])
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(PartLse + seq * stride_ln + head * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    PartOut, PartLse, Out, stride_pn, stride_ph, stride_ps, stride_ln, stride_lh,
    stride_on, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(PartLse + row * stride_ln + head * stride_lh + s, mask=s < NUM_SPLITS,
                  other=float("-inf"))
    used = lse > float("-inf")              # empty chunks wrote no partial output
    w = tl.where(used, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    dv = tl.arange(0, BLOCK_DV)
    part = tl.load(PartOut + row * stride_pn + head * stride_ph + s[:, None] * stride_ps
                   + dv[None, :], mask=used[:, None] & (dv < DV)[None, :], other=0.0)
    o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + row * stride_on + head * stride_oh + dv, o.to(Out.dtype.element_ty),
             mask=dv < DV)


@dataclass(frozen=True)
class TileConfig:
    """Block shape and launch knobs of one kernel specialisation."""

    block_m: int      # query rows (tokens x heads-in-group) per program
    block_n: int      # keys per loop step
    num_warps: int    # warps per program
    num_stages: int   # software-pipelining depth of the key loop
    split_mask: bool = True   # run blocks every row fully sees through a loop without masks


def pick_config(decode: bool, group: int, k_dim: int) -> TileConfig:
    """Block shapes picked from sweeps on an H200 (bench/paged_attention.py; numbers in kernels/NOTES.md).

    Decode streams K/V: 128 keys of <=128 channels per step kept it at the copy bandwidth; MLA's
    576-wide keys did best at 64 per step over 4 warps. Prefill multiplies matrices: 128x128
    tiles over 8 warps for ordinary heads, 32x32 for MLA's wide ones (register pressure).
    """
    rows = max(16, triton.next_power_of_2(group))
    wide = k_dim > 256
    if decode:
        return TileConfig(rows, 64 if wide else 128, 4, 2)
    if wide:
        return TileConfig(max(rows, 32), 32, 4, 2)
    return TileConfig(max(rows, 128), 128, 8, 3)


_SM_COUNT: dict[int, int] = {}


def decode_splits(n_programs: int, device: torch.device) -> int:
    """How many KV chunks each decode program's context is cut into: enough to fill the GPU twice,
    at most 16. At batch 1 (8 kv heads), 32 splits left ~20 keys a chunk: 8.0 µs a layer at
    512-1,024 tokens against 7.5 at 16 (H200, bench/paged_attention.py --sections splits); 16 x 8
    programs still fill the 132 SMs once for long contexts."""
    if device.type != "cuda":
        return 1 if n_programs >= 8 else 4      # the interpreter: still exercise the merge path
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(16, math.ceil(2 * _SM_COUNT[index] / n_programs)))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                    page_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, v_dim: int,
                    num_splits: int | None = None, config: TileConfig | None = None,
                    cascade: torch.Tensor | None = None,
                    prefix_config: TileConfig | None = None) -> torch.Tensor:
    """out[N, Hq, v_dim]; see the module docstring.

    num_splits and config override the decode split count and the block shape (for tests and
    benchmarks; the defaults come from `decode_splits` and `pick_config`); prefix_config the
    cascade prefix kernel's (benchmarks: the plan's chunks must fit its block_m rows).
    cascade (decode only; an int plan on the device, see kernels/cascade.py): the caller's
    promise that each chunk's sequences hold their first shared tokens in the same pages. Those
    keys are then attended once per chunk (cascade attention); a plan of zeros turns it off
    without a new graph.
    """
    check_paged_args(q, k_cache, v_cache, page_table, cu_seqlens_q, context_lens, v_dim)
    if num_splits is not None and not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits={num_splits} must be in 1..256")
    if any(c is not None and c.dtype not in (q.dtype, torch.float8_e4m3fn) for c in (k_cache, v_cache)):
        raise ValueError(f"k_cache and v_cache must have q's dtype or float8_e4m3fn; got q {q.dtype}, "
                         f"{k_cache.dtype}, {None if v_cache is None else v_cache.dtype}")
    q, k_cache = _last_dim_contiguous(q), _last_dim_contiguous(k_cache)
    page_table = _last_dim_contiguous(page_table)
    value_in_key = v_cache is None
    v = k_cache if value_in_key else _last_dim_contiguous(v_cache)
    n_tokens, n_heads, k_dim = q.shape
    n_seqs, n_kv, page_size = context_lens.shape[0], k_cache.shape[2], k_cache.shape[1]
    group = n_heads // n_kv
    out = torch.empty(n_tokens, n_heads, v_dim, dtype=q.dtype, device=q.device)
    if n_tokens == 0 or n_seqs == 0:
        return out
    # MLA: the first v_dim key channels double as the value, the rest (rope part) is extra.
    kd1 = v_dim if value_in_key else k_dim
    kd2 = k_dim - kd1
    decode = n_tokens == n_seqs             # every sequence contributes >= 1 query, so each has 1
    cfg = config or pick_config(decode, group, k_dim)
    if cfg.block_m < group:
        raise ValueError(f"a group of {group} query heads per kv head needs block_m >= {group}, "
                         f"got {cfg.block_m}")
    tpt = cfg.block_m // group
    if decode:
        splits = num_splits or decode_splits(n_seqs * n_kv, q.device)
        n_tiles, tile_seq, tile_blk = n_seqs, cu_seqlens_q, cu_seqlens_q   # tile = sequence
    else:
        splits = 1
        tiles = (cu_seqlens_q[1:] - cu_seqlens_q[:-1] + tpt - 1) // tpt
        ends = torch.cumsum(tiles, 0)
        n_tiles = (n_tokens + tpt - 1) // tpt + n_seqs          # shape-only bound on the tile count
        ids = torch.arange(n_tiles, device=q.device, dtype=ends.dtype)
        tile_seq = torch.searchsorted(ends, ids, right=True).to(torch.int32)
        first = ends - tiles
        tile_blk = (ids - first[tile_seq.clamp(max=n_seqs - 1).long()]).to(torch.int32)
    n_chunks = (cascade.numel() - n_seqs) // 3 if cascade is not None else 0
    shared = decode and n_chunks > 0
    blocks = dict(BLOCK_D1=max(16, triton.next_power_of_2(kd1)),
                  BLOCK_D2=max(16, triton.next_power_of_2(max(kd2, 1))),
                  BLOCK_DV=max(16, triton.next_power_of_2(v_dim)))
    prefix_splits = 0
    if shared:
        rows = prefix_block_rows(k_dim, group)
        prefix_cfg = prefix_config or (TileConfig(rows, 32, 4, 1) if k_dim > 256 else TileConfig(rows, 64, 4, 2))
        rows = prefix_cfg.block_m
        # Splits as if every sequence were in a full chunk (shape-only, for graphs); the grid has
        # one program row per chunk slot, and unused slots exit at once.
        prefix_splits = decode_splits(triton.cdiv(n_seqs * group, rows) * n_kv, q.device)
    slots = prefix_splits + splits
    if slots > 1:
        part = torch.empty(n_tokens, n_heads, slots, v_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(n_tokens, n_heads, slots, dtype=torch.float32, device=q.device)
    else:
        part, lse = out, out                # unused by the kernel
    if shared:
        _shared_prefix_kernel[(n_chunks, n_kv, prefix_splits)](
            q, k_cache, v, part, lse, page_table, cascade, scale * LOG2E, n_seqs, n_chunks,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v.stride(0), v.stride(1), v.stride(2), part.stride(0), part.stride(1), part.stride(2),
            lse.stride(0), lse.stride(1), page_table.stride(0),
            G=group, PAGE=page_size, KD1=kd1, KD2=kd2, DV=v_dim, **blocks,
            BLOCK_M=prefix_cfg.block_m, BLOCK_N=prefix_cfg.block_n, VALUE_IN_KEY=value_in_key,
            NUM_SPLITS=prefix_splits, num_warps=prefix_cfg.num_warps, num_stages=prefix_cfg.num_stages,
        )
    _paged_attn_kernel[(n_tiles, n_kv, splits)](
        q, k_cache, v, out, part, lse, page_table, cu_seqlens_q, context_lens, tile_seq, tile_blk,
        cascade if shared else context_lens, scale * LOG2E, n_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2) if slots > 1 else 0,
        lse.stride(0), lse.stride(1), page_table.stride(0),
        G=group, PAGE=page_size, KD1=kd1, KD2=kd2, DV=v_dim, **blocks,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, TPT=tpt,
        VALUE_IN_KEY=value_in_key, DECODE=decode, NUM_SPLITS=splits, SPLIT_MASK=cfg.split_mask,
        SHARED=shared, SPLIT_BASE=prefix_splits,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if slots > 1:
        _merge_splits_kernel[(n_tokens, n_heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0),
            lse.stride(1), out.stride(0), out.stride(1),
            NUM_SPLITS=slots, BLOCK_S=triton.next_power_of_2(slots), DV=v_dim,
            BLOCK_DV=max(16, triton.next_power_of_2(v_dim)), num_warps=4,
        )
    return out
