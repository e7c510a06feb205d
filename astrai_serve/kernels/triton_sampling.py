"""The Gumbel-max draw of gumbel.py in Triton: the logits are read once, the noise is hashed in
registers and each program keeps a running argmax, so a step's sampling is two launches and one
read of the [S, vocab] logits (instead of softmax, noise, divide and argmax passes, plus one
noise launch per seeded row).

A row is split over several programs: program (row, j) scans one contiguous span of the
vocabulary and writes its best (score, index); a second, tiny kernel picks each row's winner.
One program per row left a GRPO step (256 rows of 151,936 fp32 logits) at 247 µs on an H200,
~0.6 TB/s: 256 programs cannot keep the memory system of 132 SMs busy, and a batch-1 decode
step had a single program read the whole row.

Run `python -m astrai_serve.kernels.triton_sampling` (with TRITON_INTERPRET=1 on a CPU) to check
it against the torch reference bit for bit on the noise and token for token on the draws;
bench/sampling.py times it on a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048              # logits a program reads per step of its loop
PROGRAMS = 2048           # programs a launch aims for: ~2 waves on 132 SMs (H100/H200) holding 8
                          # each (ptxas for sm_90a: 64 registers a thread at 4 warps)
MIN_SPAN_BLOCKS = 2       # loop steps a split takes at least: its fixed cost (keys, reductions) stays small


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _gumbel_score(x, offs, k0, k1, greedy, inv_t, noise_on):
    """x / T + Gumbel noise (x itself on greedy rows), in float32: the ops of the torch reference."""
    h = _fmix32(_fmix32(offs.to(tl.uint32) * 0x9E3779B9 + k0) ^ k1)
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    gumbel = -tl.log(-tl.log(u))
    return tl.where(greedy, x, x * inv_t + gumbel * noise_on)


# The per-row temperatures and keys may be views of a packed host copy: never specialised on
# their alignment (a JIT compile mid-serving costs ~1 s; see triton_attention._METADATA).
@triton.jit(do_not_specialize=["span"], do_not_specialize_on_alignment=["temps_ptr", "keys_ptr"])
def _gumbel_split_kernel(x_ptr, stride_x, temps_ptr, keys_ptr, best_ptr, best_i_ptr, span,
                         V: tl.constexpr, BLOCK: tl.constexpr):
    # Program (row, j) scans logits [j * span, (j + 1) * span) of its row. Only V (the vocabulary)
    # is a compile-time constant: span and the split count change with the batch size, and the
    # engine captures graphs for many batch sizes, all on one compilation.
    row = tl.program_id(0)
    j = tl.program_id(1)
    t = tl.load(temps_ptr + row)
    k0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    greedy = t <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    noise_on = tl.where(greedy, 0.0, 1.0)
    x_row = x_ptr + row.to(tl.int64) * stride_x         # S x V may pass 2**31 entries
    lo = j * span
    hi = tl.minimum(lo + span, V)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < hi
        x = tl.load(x_row + offs, mask=inside, other=float("-inf")).to(tl.float32)
        score = tl.where(inside, _gumbel_score(x, offs, k0, k1, greedy, inv_t, noise_on), float("-inf"))
        better = score > best            # strict: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best, 0)
    # The smallest index among the lanes holding the maximum: torch.argmax's first occurrence.
    # A span of nothing but -inf reports index 0, which is also torch's answer for such a row.
    first = tl.min(tl.where(best == top, best_i, V), 0)
    out = row * tl.num_programs(1) + j
    tl.store(best_ptr + out, top)
    tl.store(best_i_ptr + out, first)


@triton.jit(do_not_specialize=["splits"])
def _pick_split_kernel(best_ptr, best_i_ptr, out_ptr, splits, V: tl.constexpr, SPLITS_POW2: tl.constexpr):
    row = tl.program_id(0)
    j = tl.arange(0, SPLITS_POW2)
    inside = j < splits
    best = tl.load(best_ptr + row * splits + j, mask=inside, other=float("-inf"))
    best_i = tl.load(best_i_ptr + row * splits + j, mask=inside, other=V)
    top = tl.max(best, 0)
    # Spans are in vocabulary order, so the smallest index holding the maximum is the first
    # split's among those that hold it: the row's first maximum, as torch.argmax.
    first = tl.min(tl.where(best == top, best_i, V), 0)
    tl.store(out_ptr + row, first.to(tl.int64))


def split_plan(rows: int, vocab: int, programs: int = PROGRAMS) -> tuple[int, int, int]:
    """(block, span, splits) from the shapes only, so a CUDA graph captures a fixed grid.

    Splits per row: enough that rows x splits reaches `programs`, but no more than keeps every
    span MIN_SPAN_BLOCKS BLOCKs long; spans are whole BLOCKs, and splits is recounted from the
    span so that none is empty. qwen3 (151,936): S = 1 to 64 -> 25 splits of 6,144, S = 256 -> 8
    of 20,480, S >= 2,048 -> 1. Always two launches, even at one split: one code path, and the
    pick costs a launch (a few µs) against a pass over S x V logits. bench/sampling.py --programs
    times other targets.
    """
    block = min(BLOCK, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, block)
    splits = max(1, min(triton.cdiv(programs, max(rows, 1)), blocks // MIN_SPAN_BLOCKS))
    span = triton.cdiv(blocks, splits) * block
    return block, span, triton.cdiv(vocab, span)


def gumbel_argmax(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [S] for float logits x [S, V], temps [S] float32 (<= 0: greedy), keys int64 [S, 2]."""
    return _gumbel_argmax(x, temps, keys, split_plan(*x.shape))


def _gumbel_argmax(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor,
                   plan: tuple[int, int, int]) -> torch.Tensor:
    # The plan is a parameter so that selfcheck can split small vocabularies (the interpreter is
    # too slow for ones that split_plan splits) and bench/sampling.py can try other targets.
    s, v = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(s, dtype=torch.int64, device=x.device)
    if s:
        block, span, splits = plan
        best = torch.empty(s, splits, dtype=torch.float32, device=x.device)
        best_i = torch.empty(s, splits, dtype=torch.int32, device=x.device)
        _gumbel_split_kernel[(s, splits)](x, x.stride(0), temps.float().contiguous(), keys.contiguous(), best, best_i,
                                          span, v, BLOCK=block)
        # The pick's width follows the vocabulary (the most splits split_plan makes for it), not
        # this batch's split count: one compile serves every batch size, none happens mid-serving.
        width = triton.next_power_of_2(max(splits, triton.cdiv(v, block) // MIN_SPAN_BLOCKS))
        _pick_split_kernel[(s,)](best, best_i, out, splits, v, width)
    return out


def selfcheck() -> None:
    """Interpreted (or GPU) kernel == torch reference, token for token: greedy rows mixed with
    sampled ones, many rows, vocabularies that are no multiple of BLOCK or of the split count,
    ties inside a split and across split boundaries, rows of -inf."""
    import numpy as np

    from astrai_serve.kernels.gumbel import gumbel_argmax_reference, seeded_keys, split_keys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # (rows, vocab, plan (block, span, splits) or None for split_plan's). The interpreter takes
    # ~10 ms a loop step and ~3 ms a program, so small vocabularies get explicit splits here:
    # 300 rows x 3 splits (the last one 904 wide) is ~12 s of the ~15 s this takes on a CPU.
    cases = [(5, 7, None), (9, 3000, None), (4, 66535, None),            # 66,535: 7 splits of 10,240
             (300, 5000, (2048, 2048, 3)), (6, 1000, (64, 256, 4))]      # 4 loop steps a split
    if device == "cpu":
        from astrai_serve.kernels.cases import patch_triton_interpreter

        patch_triton_interpreter()          # loop bounds computed in the kernel, under numpy >= 2
    else:
        cases += [(s, 151936, None) for s in (1, 64, 256)]                # qwen3's vocabulary
    g = torch.Generator().manual_seed(0)
    for s, v, plan in cases:
        block, span, splits = plan = plan or split_plan(s, v)
        assert span % block == 0 and (splits - 1) * span < v <= splits * span, plan
        x = (torch.randn(s, v, generator=g) * 3).to(device)
        top = x.max() + 1
        last = span * (splits - 1)                      # the first index of the last split
        special = s >= 4                                # (one-row batches: the plain draw only)
        if special:
            x[0, 1:4] = top                             # a tie inside one split: first index wins
            x[1, 3] = x[1, last] = x[1, v - 1] = top    # the same tie across splits
            x[2, :] = float("-inf")                     # nothing finite: index 0, as torch.argmax
            x[3, : v // 2] = float("-inf")              # what a top-k/top-p filter leaves
        temps = torch.rand(s, generator=g) * 1.5 + 0.1
        temps[torch.rand(s, generator=g) < 0.3] = 0.0   # greedy and sampled rows mixed
        if special:
            temps[:3] = 0.0                             # the tie rows are greedy
        temps = temps.to(device)
        keys = torch.from_numpy(split_keys(seeded_keys(np.arange(s) * 7919, np.arange(s) + 100))).to(device)
        want = gumbel_argmax_reference(x, temps, keys)
        got = _gumbel_argmax(x, temps, keys, plan)
        assert torch.equal(got, want), (s, v, plan, (got != want).nonzero().flatten().tolist())
        if special:
            assert got[:3].tolist() == [1, min(3, last), 0], got[:3].tolist()
    print("gumbel_argmax: kernel == reference")


if __name__ == "__main__":
    selfcheck()
