"""RMSNorm with its residual add, and SwiGLU's silu(gate) * up: one Triton launch each.

Why: the uncompiled serving forward (eager, or a CUDA graph of eager) pays per kernel launched.
A qwen3-0.6b decode step is ~1,600 kernels over its 28 layers, ~57 a layer. Of those, the
model's RMSNorm (layers.RMSNorm: float(), pow, mean, add eps, rsqrt, mul, to(dtype), mul by the
weight) is ~8 eager kernels, twice a layer plus the residual add before each, and SwiGLU's
`F.silu(gate) * up` is 2. Here `add_rms_norm` is one launch for the add and the norm together
(both outputs), and `silu_mul` one for the activation. Both are torch custom ops
(`torch.ops.astrai.rms_norm`, `astrai.add_rms_norm`, `astrai.silu_mul`) with fake shape
functions, so torch.compile keeps each as one opaque node.

Contract:
- `add_rms_norm(x, residual, weight, eps) -> (normed, new_residual)`: x and residual [N, D] of one
  floating dtype (residual may be None), weight [D] of x's dtype, 1 <= D <= MAX_D. Computes
      r = x if residual is None else x + residual          (rounded to x's dtype)
      normed = weight * (r32 * rsqrt(mean(r32^2) + eps)).to(dtype)
  and returns (normed, r); r is x itself when residual is None (the `rms_norm` op then has one
  output: a custom op's outputs may not alias its inputs).
- `silu_mul(gate_up) -> out`: gate_up [N, 2K] (gate = the first K columns, up = the last K),
  out [N, K] = F.silu(gate) * up.
Rows must have unit column stride (anything else is copied first); the outputs are new and
contiguous. N may be 0 (no launch). Inference only: no autograd formula is registered. The
grid comes from shapes only and nothing reads back to the host, so both can be captured in a
CUDA graph; N is the grid, never a kernel argument, so one compile serves every batch size.

Numerics: the kernels round where torch eager rounds. The add is done in fp32 and rounded to the
dtype (as torch's bf16/fp16 add), the norm in fp32, its result rounded to the dtype, then the
product with the weight (exact in fp32 for two bf16/fp16 values) rounded once; silu in fp32 with
an IEEE division and libdevice's expf (what ATen's CUDA silu calls), rounded, then times up
rounded once. What differs is the order of the D-term sum of squares (and so the last bits of
the fp32 norm factor): new_residual and silu_mul's output agree with torch bit for bit or to an
ulp, normed to an ulp or two of its dtype (ulps measured by `selfcheck`, which asserts bounds).
Off a GPU the ops are the torch formula itself, bit for bit, unless TRITON_INTERPRET=1, where
they launch the kernels through Triton's interpreter (on CPU tensors), so CPU tests check the
kernel source; the interpreter casts fp32 -> bf16 toward zero, so bf16 is looser there.

`python -m astrai_serve.kernels.triton_norm [--json]` (TRITON_INTERPRET=1 on a CPU) checks the
kernels against the torch formula.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:            # CPU-only installs: the ops still work, through their torch path
    triton = None

MAX_D = 32768                  # one row per program: a row must fit one program's registers
# Read once, when Triton reads it too: with the interpreter on, the ops launch the kernels on
# CPU tensors (else a CPU test would only ever check the torch path).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
launches = 0                   # Triton launches made by this module (selfcheck proves the path)


def _use_kernel(t: torch.Tensor) -> bool:
    return triton is not None and (t.device.type == "cuda" or INTERPRET)


def check_add_rms_norm_args(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    """ValueError naming the bad shape or dtype, else None."""
    if x.dim() != 2 or not 1 <= x.shape[1] <= MAX_D:
        raise ValueError(f"x must be [N, D] with 1 <= D <= {MAX_D}; got x {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point; got {x.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x {tuple(x.shape)} {x.dtype}; got residual "
                         f"{tuple(residual.shape)} {residual.dtype}")
    if tuple(weight.shape) != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [D] with D={x.shape[1]} in x's dtype {x.dtype}; got weight "
                         f"{tuple(weight.shape)} {weight.dtype}")
    devices = {t.device for t in (x, residual, weight) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, residual and weight must be on one device; got {sorted(map(str, devices))}")


def check_silu_mul_args(gate_up: torch.Tensor) -> None:
    """ValueError naming the bad shape or dtype, else None."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [N, 2K] (gate | up); got gate_up {tuple(gate_up.shape)}")
    if not gate_up.dtype.is_floating_point:
        raise ValueError(f"gate_up must be floating point; got {gate_up.dtype}")


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's eager math (the residual add, then layers.RMSNorm.forward)."""
    r = x if residual is None else x + residual
    r32 = r.float()
    y = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype), r


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(X, R, W, Y, RO, stride_x, stride_r, eps,
                         D: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """Row `program_id` of x (+ residual -> RO) -> its RMSNorm times W -> Y (RO, Y contiguous)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        dtype = Y.dtype.element_ty
        r = tl.load(X + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RESIDUAL:         # torch adds bf16/fp16 in fp32 and rounds the sum to the dtype
            res = tl.load(R + row * stride_r + cols, mask=ok, other=0.0)
            r = (r.to(tl.float32) + res.to(tl.float32)).to(dtype)
            tl.store(RO + row * D + cols, r, mask=ok)
        r32 = r.to(tl.float32)
        inv = tl.rsqrt(tl.sum(r32 * r32, axis=0) / D + eps)
        y = (r32 * inv).to(dtype)                        # eager rounds the norm, then
        w = tl.load(W + cols, mask=ok, other=0.0)
        tl.store(Y + row * D + cols, (w.to(tl.float32) * y.to(tl.float32)).to(dtype), mask=ok)

    @triton.jit
    def _silu_mul_kernel(GU, O, stride_gu, K: tl.constexpr, BLOCK: tl.constexpr, PRECISE: tl.constexpr):
        """Columns [pid1 * BLOCK, +BLOCK) of row pid0: silu(gate) rounded, times up, rounded."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < K
        dtype = O.dtype.element_ty
        gate = tl.load(GU + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(GU + row * stride_gu + K + cols, mask=ok, other=0.0)
        # ATen's silu is x / (1 + expf(-x)) with an IEEE divide; Triton's tl.exp and `/` are the
        # fast approximations, a few fp32 ulps off. The interpreter has no libdevice (numpy's exp).
        e = libdevice.exp(-gate) if PRECISE else tl.exp(-gate)
        act = tl.math.div_rn(gate, 1.0 + e).to(dtype)
        tl.store(O + row * K + cols, (act.to(tl.float32) * up.to(tl.float32)).to(dtype), mask=ok)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    global launches
    n, d = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    new_residual = None if residual is None else torch.empty_like(out)
    if n == 0:
        return out, new_residual
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(n,)](
        x, x if residual is None else residual, weight.contiguous(), out,
        out if new_residual is None else new_residual,
        x.stride(0), 0 if residual is None else residual.stride(0), float(eps),
        D=d, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 256)),         # ~8 elements a thread: 16-byte bf16 loads
    )
    launches += 1
    return out, new_residual


def _launch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    global launches
    n, k = gate_up.shape[0], gate_up.shape[1] // 2
    gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
    out = torch.empty(n, k, dtype=gate_up.dtype, device=gate_up.device)
    if n == 0 or k == 0:
        return out
    block = min(1024, triton.next_power_of_2(k))        # qwen3-0.6b's K=3072: 3 programs a row
    _silu_mul_kernel[(n, triton.cdiv(k, block))](
        gate_up, out, gate_up.stride(0), K=k, BLOCK=block, PRECISE=not INTERPRET,
        num_warps=max(1, min(4, block // 256)),
    )
    launches += 1
    return out


@torch.library.custom_op("astrai::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.RMSNorm of x [N, D] with weight [D]: one launch on CUDA, the torch math elsewhere."""
    check_add_rms_norm_args(x, None, weight)
    if _use_kernel(x):
        return _launch_rms_norm(x, None, weight, eps)[0]
    return add_rms_norm_reference(x, None, weight, eps)[0]


@rms_norm_op.register_fake
def _rms_norm_shape(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("astrai::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): one launch on CUDA, the torch math elsewhere."""
    check_add_rms_norm_args(x, residual, weight)
    if _use_kernel(x):
        return _launch_rms_norm(x, residual, weight, eps)
    normed, r = add_rms_norm_reference(x, residual, weight, eps)
    return normed, r


@add_rms_norm_op.register_fake
def _add_rms_norm_shape(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) = (RMSNorm(r) * weight, r) with r = x (+ residual): see the module doc."""
    if residual is None:
        return rms_norm_op(x, weight, eps), x
    return add_rms_norm_op(x, residual, weight, eps)


@torch.library.custom_op("astrai::silu_mul", mutates_args=())
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up = [gate | up] [N, 2K] -> [N, K]: one launch on CUDA."""
    check_silu_mul_args(gate_up)
    if _use_kernel(gate_up):
        return _launch_silu_mul(gate_up)
    return silu_mul_reference(gate_up)


@silu_mul.register_fake
def _silu_mul_shape(gate_up: torch.Tensor) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (shared) dtype lie between got and want, per element."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[got.dtype]

    def ordered(t: torch.Tensor) -> torch.Tensor:   # sign-magnitude -> a monotone integer line
        i = t.contiguous().view(bits).to(torch.int64)
        return torch.where(i < 0, -(i & (2 ** (8 * t.element_size() - 1) - 1)), i)

    return (ordered(got) - ordered(want)).abs()


# The most ulps an output may be from the torch formula's: (on CUDA, under the interpreter).
# "residual" is add_rms_norm's new_residual: the same one rounding as torch's add.
TOLERANCE = {
    # normed: the fp32 norm factor's last bits (sum order) can move y an ulp and weight * y one more
    ("rms_norm", "float32"): (4, 8), ("rms_norm", "bfloat16"): (2, 8), ("rms_norm", "float16"): (2, 2),
    ("residual", "float32"): (0, 0), ("residual", "bfloat16"): (0, 1), ("residual", "float16"): (0, 0),
    # libdevice's expf is ATen's; the interpreter's is numpy's, a few fp32 ulps away
    ("silu_mul", "float32"): (1, 8), ("silu_mul", "bfloat16"): (1, 4), ("silu_mul", "float16"): (1, 2),
}  # the interpreter casts fp32 -> bf16 toward zero: each of the chain's roundings is <= 1 ulp off


def within_tolerance(r: dict) -> bool:
    """One `check_cases` result: its kernel ran, shapes and dtypes are torch's, errors within TOLERANCE."""
    i = int(r["interpreted"])
    return (r["launched"] and r["shape_ok"] and r["max_ulps"] <= TOLERANCE[r["op"], r["dtype"]][i]
            and r["max_ulps_residual"] <= TOLERANCE["residual", r["dtype"]][i])


def check_cases(device: str) -> list[dict]:
    """Every case run through the public ops, as one dict each (errors in ulps, launch counted)."""
    interpreted = device == "cpu"
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rows, dims, ks = (1, 3, 17), (64, 1000, 1024), (64, 96, 3072)
    if not interpreted:
        rows, dims, ks = rows + (0, 256), dims + (4096, 8192), ks + (8192,)
    results = []
    for dtype in dtypes:
        for n in rows:
            for d in dims:
                for has_res in (False, True):
                    x = (torch.randn(n, d, generator=gen) * 3).to(device, dtype)
                    res = (torch.randn(n, d, generator=gen) * 3).to(device, dtype) if has_res else None
                    w = (1 + 0.3 * torch.randn(d, generator=gen)).to(device, dtype)
                    before = launches
                    got, got_r = add_rms_norm(x, res, w, 1e-6)
                    want, want_r = add_rms_norm_reference(x, res, w, 1e-6)
                    results.append(_result("rms_norm", dtype, n, d, has_res, launches - before,
                                           [(got, want), (got_r, want_r)], interpreted))
            for k in ks:
                gate_up = (torch.randn(n, 2 * k, generator=gen) * 4).to(device, dtype)
                before = launches
                got = silu_mul(gate_up)
                results.append(_result("silu_mul", dtype, n, k, False, launches - before,
                                       [(got, silu_mul_reference(gate_up))], interpreted))
    return results


def _result(op: str, dtype: torch.dtype, n: int, d: int, has_res: bool, launched: int,
            pairs: list[tuple[torch.Tensor, torch.Tensor]], interpreted: bool) -> dict:
    errs = [ulps(g, w) for g, w in pairs]
    name = str(dtype).removeprefix("torch.")
    return {"name": f"{op} {name} N={n} {'D' if op == 'rms_norm' else 'K'}={d}" + (" +residual" * has_res),
            "op": op, "dtype": name, "n": n, "d": d, "residual": has_res, "interpreted": interpreted,
            "launched": launched == (1 if n else 0),
            "shape_ok": all(g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous() for g, w in pairs),
            "max_ulps": max((int(e.max()) for e in errs if e.numel()), default=0),
            "max_ulps_residual": int(errs[1].max()) if len(errs) > 1 and errs[1].numel() else 0,
            "frac_exact": float(sum(int((e == 0).sum()) for e in errs) / max(1, sum(e.numel() for e in errs)))}


def selfcheck(as_json: bool = False) -> list[dict]:
    """The kernels through the ops against the torch formula, fp32/bf16/fp16: CUDA, or the CPU
    under TRITON_INTERPRET=1 (without it the ops are the formula itself and this checks nothing)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRET:
        raise RuntimeError("on a CPU run this with TRITON_INTERPRET=1 (else no kernel runs)")
    results = check_cases(device)
    if as_json:
        print(json.dumps(results))
        return results
    bad = [r for r in results if not within_tolerance(r)]
    assert not bad, f"{len(bad)} of {len(results)} cases off: {bad[:5]}"
    print("triton_norm: kernel == torch")
    return results


if __name__ == "__main__":
    selfcheck(as_json="--json" in sys.argv[1:])
