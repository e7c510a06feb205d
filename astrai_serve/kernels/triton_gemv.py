"""Matrix-vector products for decode at batch 1-4: y[M, N] = x[M, K] @ W[N, K]^T, bf16 in, fp32 sums.

Why: at batch 1 a qwen3-0.6b decode step is ~0.9 ms of cuBLAS matmuls over 1.15 GB of weights,
about 1.2 TB/s on an H200 (bench/profile_step.py W3) where copies reach 4.2 TB/s: the weights are
4-12 MB per matrix, too small for cuBLAS's tiles to keep enough bytes in flight. Here each
program streams BLOCK_N whole rows of W once, in BLOCK_K-wide tiles, and reuses every tile for
all M rows of x, so the read of W is the only traffic that matters and the grid (N / BLOCK_N
programs) is sized to fill the GPU.

Not wired into the engine yet: bench/gemv.py measures it against cuBLAS per shape first.
`python -m astrai_serve.kernels.triton_gemv` (TRITON_INTERPRET=1 on a CPU) checks it against torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GemvConfig:
    block_n: int      # rows of W per program
    block_k: int      # columns per loop step
    num_warps: int
    num_stages: int


@triton.jit
def _gemv_kernel(X, W, Y, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + cols) < K
        w = tl.load(w_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        # One tile of W serves every row of x (M <= 4, unrolled at compile time).
        acc0 += tl.sum(w * tl.load(X + k + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :], 1)
        if M > 1:
            acc1 += tl.sum(w * tl.load(X + stride_xm + k + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :], 1)
        if M > 2:
            acc2 += tl.sum(w * tl.load(X + 2 * stride_xm + k + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :], 1)
        if M > 3:
            acc3 += tl.sum(w * tl.load(X + 3 * stride_xm + k + cols, mask=k_ok, other=0.0).to(tl.float32)[None, :], 1)
    out_ty = Y.dtype.element_ty
    tl.store(Y + rows, acc0.to(out_ty), mask=row_ok)
    if M > 1:
        tl.store(Y + stride_ym + rows, acc1.to(out_ty), mask=row_ok)
    if M > 2:
        tl.store(Y + 2 * stride_ym + rows, acc2.to(out_ty), mask=row_ok)
    if M > 3:
        tl.store(Y + 3 * stride_ym + rows, acc3.to(out_ty), mask=row_ok)


MAX_ROWS = 4


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """F.linear(x, w) for x [M <= 4, K] and w [N, K], both contiguous in K."""
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= MAX_ROWS or w.shape[1] != k:
        raise ValueError(f"gemv takes x [1..{MAX_ROWS}, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv needs x and w contiguous in their last dimension")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, w, y, n, x.stride(0), w.stride(0), y.stride(0), K=k, M=m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def candidate_configs() -> list[GemvConfig]:
    """The configurations bench/gemv.py sweeps."""
    # A handful (each compiles once per K): few rows and wide tiles for the narrow matrices,
    # more rows for the tall ones, where the grid fills the GPU anyway.
    return [GemvConfig(*c) for c in ((2, 2048, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3),
                                     (16, 512, 4, 3), (16, 512, 8, 4), (32, 256, 4, 3), (64, 128, 4, 4))]


def selfcheck() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    for m, n, k, cfg in ((1, 37, 300, GemvConfig(8, 128, 4, 2)), (3, 64, 256, GemvConfig(16, 64, 4, 2)),
                         (4, 10, 1000, GemvConfig(4, 256, 4, 2)), (2, 129, 64, GemvConfig(32, 64, 4, 2))):
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        want = (x.float() @ w.float().T)
        got = gemv(x, w, cfg).float()
        err = float((got - want).norm() / want.norm())
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), (m, n, k, err)
    print("gemv: kernel == torch")


if __name__ == "__main__":
    selfcheck()
