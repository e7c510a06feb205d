"""The Gumbel-max draw of gumbel.py in one Triton kernel: each program reads one row of logits
once, hashes its noise in registers and keeps a running argmax, so a step's sampling is one
launch and one read of the [S, vocab] float32 logits (instead of softmax, noise, divide and
argmax passes, plus one noise launch per seeded row).

Run `python -m astrai_serve.kernels.triton_sampling` (with TRITON_INTERPRET=1 on a CPU) to check
it against the torch reference bit for bit on the noise and token for token on the draws.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _gumbel_argmax_kernel(x_ptr, stride_x, temps_ptr, keys_ptr, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    # V (the vocabulary) is a compile-time constant: one engine compiles this once.
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row)
    k0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    greedy = t <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    noise_on = tl.where(greedy, 0.0, 1.0)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=float("-inf")).to(tl.float32)
        h = _fmix32(_fmix32(offs.to(tl.uint32) * 0x9E3779B9 + k0) ^ k1)
        u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(greedy, x, x * inv_t + gumbel * noise_on)
        score = tl.where(inside, score, float("-inf"))
        better = score > best            # strict: each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best, 0)
    # The smallest index among the lanes holding the maximum: torch.argmax's first occurrence.
    first = tl.min(tl.where(best == top, best_i, V), 0)
    tl.store(out_ptr + row, first.to(tl.int64))


def gumbel_argmax(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [S] for float logits x [S, V], temps [S] float32 (<= 0: greedy), keys int64 [S, 2]."""
    s, v = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(s, dtype=torch.int64, device=x.device)
    if s:
        _gumbel_argmax_kernel[(s,)](x, x.stride(0), temps.float().contiguous(), keys.contiguous(), out, v,
                                    BLOCK=min(BLOCK, triton.next_power_of_2(v)))
    return out


def selfcheck() -> None:
    """Interpreted (or GPU) kernel == torch reference on random rows, greedy rows and ties."""
    import numpy as np

    from astrai_serve.kernels.gumbel import gumbel_argmax_reference, seeded_keys, split_keys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    for s, v in ((5, 7), (9, 3000), (3, 4096)):
        x = (torch.randn(s, v, generator=g) * 3).to(device)
        x[0, 1:4] = x[0].max() + 1                      # a tie: first index wins
        temps = torch.tensor([0.0] + [0.5 + i for i in range(s - 1)], device=device)
        keys = torch.from_numpy(split_keys(seeded_keys(np.arange(s) * 7919, np.arange(s) + 100))).to(device)
        want = gumbel_argmax_reference(x, temps, keys)
        got = gumbel_argmax(x, temps, keys)
        assert torch.equal(got, want), (s, v, got.tolist(), want.tolist())
        assert got[0].item() == 1
    print("gumbel_argmax: kernel == reference")


if __name__ == "__main__":
    selfcheck()
