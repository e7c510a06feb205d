"""Matrix-vector products for decode at batch 1-4: y[M, N] = x[M, K] @ W[N, K]^T, bf16 in, fp32 sums.

Why: at batch 1 a qwen3-0.6b decode step is ~0.9 ms of cuBLAS matmuls over 1.15 GB of weights,
about 1.2 TB/s on an H200 (a profiled W3 step) where copies reach 4.2 TB/s: the weights are
4-12 MB per matrix, too small for cuBLAS's tiles to keep enough bytes in flight. Here each
program streams BLOCK_N whole rows of W once, in BLOCK_K-wide tiles, and reuses every tile for
all M rows of x, so the read of W is the only traffic that matters and the grid (N / BLOCK_N
programs) is sized to fill the GPU.

Two options ride on the same kernel as compile-time flags. SILU_MUL (gemv_silu_mul): x is SwiGLU's
[gate | up] and the kernel multiplies silu(gate) * up as it loads each tile, so the down projection
needs no launch of its own for the activation. PDL (pdl=True, Hopper+): programmatic dependent
launch, each GEMV reads its first weight tile while the kernel before it is still finishing
(launch and DRAM latency, not bandwidth, dominate these 4-12 MB products); see _gemv_kernel.

bench/gemv.py measures it against cuBLAS per shape, and (--chain) a layer's four products chained.
`python -m astrai_serve.kernels.triton_gemv` (TRITON_INTERPRET=1 on a CPU) checks it against torch.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@dataclass(frozen=True)
class GemvConfig:
    block_n: int      # rows of W per program
    block_k: int      # columns per loop step
    num_warps: int
    num_stages: int


@triton.jit
def _x_tile(X, row, k, cols, K: tl.constexpr, SILU_MUL: tl.constexpr):
    """Columns k + cols of x's row `row` as fp32, zeros past K; with SILU_MUL, of silu(gate) * up
    where the row holds gate at columns [0, K) and up at [K, 2K)."""
    k_ok = (k + cols) < K
    if SILU_MUL:
        gate = tl.load(X + row + k + cols, mask=k_ok, other=0.0).to(tl.float32)
        up = tl.load(X + row + K + k + cols, mask=k_ok, other=0.0).to(tl.float32)
        # torch.compile's `F.silu(gate) * up` computes both in fp32 and rounds once to x's dtype
        # (eager rounds twice), and the matmul then reads that rounded activation: rounding here
        # too, before widening for the FMA, keeps this within one rounding of the unfused path
        # instead of carrying extra precision the reference never had. silu as torch writes it.
        act = gate / (1.0 + tl.exp(-gate)) * up
        x = act.to(X.dtype.element_ty).to(tl.float32)
    else:
        x = tl.load(X + row + k + cols, mask=k_ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _accumulate(acc0, acc1, acc2, acc3, w, X, stride_xm, k, cols, K: tl.constexpr, M: tl.constexpr,
                SILU_MUL: tl.constexpr):
    # One tile of W serves every row of x (M <= 4, unrolled at compile time).
    acc0 += tl.sum(w * _x_tile(X, 0, k, cols, K, SILU_MUL)[None, :], 1)
    if M > 1:
        acc1 += tl.sum(w * _x_tile(X, stride_xm, k, cols, K, SILU_MUL)[None, :], 1)
    if M > 2:
        acc2 += tl.sum(w * _x_tile(X, 2 * stride_xm, k, cols, K, SILU_MUL)[None, :], 1)
    if M > 3:
        acc3 += tl.sum(w * _x_tile(X, 3 * stride_xm, k, cols, K, SILU_MUL)[None, :], 1)
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_kernel(X, W, Y, N, stride_xm, stride_wn, stride_ym,
                 K: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SILU_MUL: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + cols[None, :]
    acc0 = tl.zeros([BLOCK_N], tl.float32)
    acc1 = tl.zeros([BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_N], tl.float32)
    if PDL:
        # Launched with launch_pdl=True, this grid may start while the kernel before it still runs.
        # The next kernel may launch as soon as every program here has started (the trigger
        # fires once all of them have called it), so it reads its own first weight tile while we
        # stream ours. That is safe because nothing before gdc_wait() touches data another kernel
        # writes: a PDL successor (another of these GEMVs) waits for all of this grid to complete and
        # flush before it reads our y, and a plain launch waits for this grid as always. Every
        # earlier grid is wholly resident before a later one launches, so waiting can't deadlock.
        # (At the start rather than after gdc_wait: 372 against 420 us for bench/gemv.py --chain's
        # 112 products at batch 1 on an H200: two or more grids of look-ahead, not one.)
        gdc_launch_dependents()
        # W does not depend on the kernel before, so its first tile is read now; x may be that
        # kernel's output, so it is read only after gdc_wait(), which returns once the previous
        # grid has completed and its writes are visible.
        w = tl.load(w_ptrs, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
        gdc_wait()
        acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, w, X, stride_xm, 0, cols, K, M, SILU_MUL)
    # (No `k_first = 0 ... k_first = BLOCK_K`: the interpreter turns assigned ints into tensors
    # that range() rejects; a constexpr conditional stays a Python int in both.)
    for k in range(BLOCK_K if PDL else 0, K, BLOCK_K):
        k_ok = (k + cols) < K
        w = tl.load(w_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, w, X, stride_xm, k, cols, K, M, SILU_MUL)
    out_ty = Y.dtype.element_ty
    tl.store(Y + rows, acc0.to(out_ty), mask=row_ok)
    if M > 1:
        tl.store(Y + stride_ym + rows, acc1.to(out_ty), mask=row_ok)
    if M > 2:
        tl.store(Y + 2 * stride_ym + rows, acc2.to(out_ty), mask=row_ok)
    if M > 3:
        tl.store(Y + 3 * stride_ym + rows, acc3.to(out_ty), mask=row_ok)


MAX_ROWS = 4
# Under TRITON_INTERPRET=1 the kernel is interpreted (no griddepcontrol there): decided once, at import.
_INTERPRETED = not isinstance(_gemv_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=None)
def _pdl_supported(device: torch.device) -> bool:
    if device.type != "cuda" or _INTERPRETED or torch.version.hip or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_supported(device: torch.device | str | int) -> bool:
    """Whether the GEMV may launch with programmatic dependent launch on `device`: a compiled (not
    interpreted) kernel on an NVIDIA GPU of compute capability 9.0 or later (griddepcontrol is sm_90+)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return _pdl_supported(device)


def _launch(x: torch.Tensor, w: torch.Tensor, k: int, config: GemvConfig, silu_mul: bool, pdl: bool) -> torch.Tensor:
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv needs x and w contiguous in their last dimension")
    if pdl and not pdl_supported(x.device):
        raise ValueError(f"gemv pdl=True needs a compiled kernel on a GPU of compute capability 9.0+; "
                         f"x is on {x.device}")
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # launch_pdl is a Triton compile option (CUDAOptions.launch_pdl in backends/nvidia/compiler.py,
    # Triton 3.6 and 3.9) given as a launch kwarg; the launcher (backends/nvidia/driver.py) then sets
    # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION. The interpreter drops it.
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, w, y, n, x.stride(0), w.stride(0), y.stride(0), K=k, M=m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SILU_MUL=silu_mul, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl)
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, config: GemvConfig, pdl: bool = False) -> torch.Tensor:
    """F.linear(x, w) for x [M <= 4, K] and w [N, K], both contiguous in K. pdl: launch with
    programmatic dependent launch (see _gemv_kernel; pdl_supported(x.device) must hold)."""
    m, k = x.shape
    if not 1 <= m <= MAX_ROWS or w.dim() != 2 or w.shape[1] != k:
        raise ValueError(f"gemv takes x [1..{MAX_ROWS}, K] and w [N, K]; got {tuple(x.shape)} and {tuple(w.shape)}")
    return _launch(x, w, k, config, False, pdl)


def gemv_silu_mul(gate_up: torch.Tensor, w: torch.Tensor, config: GemvConfig, pdl: bool = False) -> torch.Tensor:
    """F.linear(F.silu(gate) * up, w) in one launch, for gate_up [M <= 4, 2K] = [gate | up] (as
    `F.linear(x, gate_up_weight).chunk(2, -1)` splits it) and w [N, K], both contiguous in K."""
    if gate_up.dim() != 2 or w.dim() != 2 or not 1 <= gate_up.shape[0] <= MAX_ROWS \
            or gate_up.shape[1] != 2 * w.shape[1]:
        raise ValueError(f"gemv_silu_mul takes gate_up [1..{MAX_ROWS}, 2K] and w [N, K]; "
                         f"got {tuple(gate_up.shape)} and {tuple(w.shape)}")
    return _launch(gate_up, w, w.shape[1], config, True, pdl)


def candidate_configs() -> list[GemvConfig]:
    """The configurations bench/gemv.py sweeps."""
    # A handful (each compiles once per K): few rows and wide tiles for the narrow matrices,
    # more rows for the tall ones, where the grid fills the GPU anyway.
    return [GemvConfig(*c) for c in ((2, 2048, 4, 3), (4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3),
                                     (16, 512, 4, 3), (16, 512, 8, 4), (32, 256, 4, 3), (64, 128, 4, 4))]


def selfcheck() -> None:
    """The kernel against torch: plain and SiLU-prologue products for 1-4 rows, odd N, K not a
    multiple of BLOCK_K (and K below one tile); on a Hopper GPU the PDL launches too, which must
    equal the plain ones bit for bit (same math, only the launch differs), and under the
    interpreter the PDL path's code with its griddepcontrol instructions as no-ops."""
    with _interpreted_pdl() if _INTERPRETED else contextlib.nullcontext():
        _selfcheck()


def _selfcheck() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    pdl_path = pdl_supported(device) or _INTERPRETED  # interpreted: griddepcontrol as no-ops
    pdls = (False, True) if pdl_path else (False,)
    g = torch.Generator().manual_seed(0)

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got.float() - want).norm() / want.norm())

    for m, n, k, cfg in ((1, 37, 300, GemvConfig(8, 128, 4, 2)), (3, 64, 256, GemvConfig(16, 64, 4, 2)),
                         (4, 10, 1000, GemvConfig(4, 256, 4, 2)), (2, 129, 64, GemvConfig(32, 64, 4, 2)),
                         (2, 33, 100, GemvConfig(2, 128, 4, 2))):
        x = torch.randn(m, k, generator=g).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        want = x.float() @ w.float().T
        plain = gemv(x, w, cfg)
        assert rel(plain, want) < tol, ("gemv", m, n, k, rel(plain, want))
        for pdl in pdls[1:]:
            assert torch.equal(gemv(x, w, cfg, pdl=pdl), plain), ("gemv pdl", m, n, k)
    for m, n, k, cfg in ((1, 37, 300, GemvConfig(8, 128, 4, 2)), (2, 51, 200, GemvConfig(4, 64, 4, 2)),
                         (3, 129, 96, GemvConfig(16, 128, 4, 2)), (4, 11, 1000, GemvConfig(2, 256, 4, 2))):
        gate_up = torch.randn(m, 2 * k, generator=g).mul(2).to(device, dtype)
        w = torch.randn(n, k, generator=g).to(device, dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        # The kernel's own math: silu(gate) * up in fp32, rounded to the input dtype, fp32 sums.
        act = (torch.nn.functional.silu(gate.float()) * up.float()).to(dtype).float()
        want = act @ w.float().T
        fused = gemv_silu_mul(gate_up, w, cfg)
        assert rel(fused, want) < tol, ("silu_mul", m, n, k, rel(fused, want))
        # and torch's own unfused path in the input dtype (bf16 rounding on CUDA)
        eager = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w).float()
        assert rel(fused, eager) < tol, ("silu_mul vs eager", m, n, k, rel(fused, eager))
        for pdl in pdls[1:]:
            assert torch.equal(gemv_silu_mul(gate_up, w, cfg, pdl=pdl), fused), ("silu_mul pdl", m, n, k)
    print("gemv: kernel == torch" + (" (PDL path too)" if pdl_path else ""))


@triton.jit
def _no_op():
    pass


@contextlib.contextmanager
def _interpreted_pdl():
    """Under the interpreter, lets selfcheck run the PDL path (first tile read before the wait,
    the loop from the second) with the griddepcontrol instructions, which it lacks, as no-ops."""
    names = {"gdc_wait": _no_op, "gdc_launch_dependents": _no_op, "pdl_supported": lambda device: True}
    saved = {name: globals()[name] for name in names}
    globals().update(names)  # the interpreter looks the kernel's globals up at each call
    try:
        yield
    finally:
        globals().update(saved)


if __name__ == "__main__":
    selfcheck()
