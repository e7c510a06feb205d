"""Qwen3's per-head q/k RMSNorm and the rotary embedding, queries and keys, in ONE Triton launch.

Why: after the fused qkv projection Qwen3 normalises every query and key head over its D
channels (RMSNorm with a weight per channel, one for q and one for k), then rotates both. In a
CUDA-graph decode step of qwen3-0.6b at batch 1 (torch.compile'd) Inductor emits two kernels per
layer for this, q and k, ~1.6 µs each: ~90 of ~1,007 µs over 28 layers. One launch for both
halves the count. The op `torch.ops.astrai.qk_norm_rope` wraps it, so a compiled graph keeps it
as one opaque node; on a CPU the op is the model's own torch math (layers.RMSNorm, apply_rope).

Contract: q [N, H, D] and k [N, Hkv, D] (any strides: the column slices of one fused
[N, (H + 2 Hkv) D] projection go in as they are, nothing is copied), weights [D], cos/sin
[N, D] gathered at each token's position in the half-split layout of `layers.rope_tables`.
Returns q_out [N, H, D] and k_out [N, Hkv, D], contiguous, in q's dtype:
    y = (x32 * rsqrt(mean(x32^2) + eps)) * weight;   out = y * cos + cat(-y[D/2:], y[:D/2]) * sin.

Blocking: one program per (token, head) over the query AND key heads, grid (N, H + Hkv); a
program loads its head's two halves (D/2 channels each, so the rotation needs no shuffle), sums
the squares of both, and writes both halves of the output. qwen3-0.6b at N=1 is 16 + 8 = 24
programs of one warp; N=256 is 6,144. The grid comes from shapes only (no host sync), so the op
can be captured in a CUDA graph. N never reaches the kernel (it is the grid), and the input
pointers are not specialised on alignment (a split's views, per-step gathers), so one compile
serves every batch size.

Numerics: the sum of squares, the norm, the weight and the rotation are all fp32 (weights and
tables are upcast on load), rounded to the output dtype once at the end. torch eager (the
model's path) rounds five times in bf16: x32 * rsqrt -> bf16, * weight -> bf16, x * cos,
rotated * sin and their sum -> bf16 each. So this kernel is the more accurate of the two: in
bf16 it is within one bf16 ulp of an fp32 reference element by element, and within a few bf16
ulps of eager (a bound of 0.02 x the largest output; see selfcheck). Inductor's compiled version
of the eager formula also keeps the chain in fp32 and rounds once, so the compiled decode sees
little change. In fp32 it equals the torch formula to ~1e-6.

Measured (H200, torch 2.11, Triton 3.6, bf16, qwen3-0.6b's 16/8 heads x 128, in a CUDA graph,
2026-11): N=1 1.16 µs against 2.60 µs for Inductor's two kernels; N=64 2.28 against 3.94;
N=256 5.20 against 6.64. The largest errors against fp32 were the same as Inductor's (0.5 ulp);
eager bf16's were 2-3x larger.

`python -m astrai_serve.kernels.triton_qk_norm_rope` (TRITON_INTERPRET=1 on a CPU) checks the
kernel against the torch formula (fp32 there: the interpreter casts fp32 -> bf16 toward zero).
"""
from __future__ import annotations

import torch

from astrai_train.model.layers import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the op still works, through its torch path
    triton = None


def check_qk_norm_rope_args(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                            k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """ValueError naming the bad shape or dtype, else None (weights None: the rotary alone)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [N,H,D] and k [N,Hkv,D]; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    n, _, d = q.shape
    if k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"q [N,H,D] and k [N,Hkv,D] must share N and D; got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if d % 2:
        raise ValueError(f"head dim D must be even (RoPE rotates halves); got q {tuple(q.shape)}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a floating dtype; got {q.dtype} and {k.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is None:
            continue
        if tuple(w.shape) != (d,) or not w.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating [D] with D={d}; got {tuple(w.shape)} {w.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (n, d) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating [N, D] with N={n}, D={d}; got {tuple(t.shape)} {t.dtype}")
    devices = {t.device for t in (q, k, q_weight, k_weight, cos, sin) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"q, k, the weights, cos and sin must be on one device; got {sorted(map(str, devices))}")


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                           k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's eager math (layers.RMSNorm.forward, then apply_rope), contiguous, in q's dtype."""
    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    return (apply_rope(norm(q, q_weight), cos, sin).to(q.dtype).contiguous(),
            apply_rope(norm(k, k_weight), cos, sin).to(k.dtype).contiguous())


if triton is not None:
    @triton.jit
    def _norm_rope_head(X, W, O, C, S, t, h, stride_xt, stride_xh, stride_xd, stride_w,
                        stride_ct, stride_cd, stride_st, stride_sd, out_row, eps,
                        D: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr):
        """Head h of token t: x [D] at X -> O + out_row (contiguous), both halves at once;
        NORM False: rotary only (a model without QK-norm, e.g. Llama; W is not read)."""
        d = tl.arange(0, BLOCK)
        ok = d < HALF
        x_row = X + t * stride_xt + h * stride_xh
        x1 = tl.load(x_row + d * stride_xd, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (d + HALF) * stride_xd, mask=ok, other=0.0).to(tl.float32)
        if NORM:
            inv = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / D + eps)
            y1 = x1 * inv * tl.load(W + d * stride_w, mask=ok, other=0.0).to(tl.float32)
            y2 = x2 * inv * tl.load(W + (d + HALF) * stride_w, mask=ok, other=0.0).to(tl.float32)
        else:
            y1, y2 = x1, x2
        c_row, s_row = C + t * stride_ct, S + t * stride_st
        c1 = tl.load(c_row + d * stride_cd, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(c_row + (d + HALF) * stride_cd, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_row + d * stride_sd, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(s_row + (d + HALF) * stride_sd, mask=ok, other=0.0).to(tl.float32)
        # rotated = cat(-y2, y1): out[:HALF] = y1 cos - y2 sin, out[HALF:] = y2 cos + y1 sin
        out_ty = O.dtype.element_ty
        tl.store(O + out_row + d, (y1 * c1 - y2 * s1).to(out_ty), mask=ok)
        tl.store(O + out_row + HALF + d, (y2 * c2 + y1 * s2).to(out_ty), mask=ok)

    # Program (t, h): token t, query head h < H or key head h - H. N is the grid, never an
    # argument; q/k (views cut from a fused projection) and cos/sin (gathered per step) are not
    # specialised on alignment, so one compile serves every step.
    @triton.jit(do_not_specialize_on_alignment=["Q", "K", "C", "S"])
    def _qk_norm_rope_kernel(Q, K, QW, KW, C, S, QO, KO,
                             stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                             stride_qw, stride_kw, stride_ct, stride_cd, stride_st, stride_sd, eps,
                             H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                             HALF: tl.constexpr, BLOCK: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        if h < H:
            _norm_rope_head(Q, QW, QO, C, S, t, h, stride_qt, stride_qh, stride_qd, stride_qw,
                            stride_ct, stride_cd, stride_st, stride_sd, (t * H + h) * D, eps,
                            D, HALF, BLOCK, NORM)
        else:
            _norm_rope_head(K, KW, KO, C, S, t, h - H, stride_kt, stride_kh, stride_kd, stride_kw,
                            stride_ct, stride_cd, stride_st, stride_sd, (t * HKV + (h - H)) * D, eps,
                            D, HALF, BLOCK, NORM)


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                        k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`qk_norm_rope_reference` in one Triton launch (fp32 inside, one rounding at the end);
    weights None: the rotary alone (`rope_reference`)."""
    if triton is None:
        raise RuntimeError("qk_norm_rope_triton needs the triton package")
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin)
    norm = q_weight is not None
    if not norm:
        q_weight = k_weight = cos          # not read (NORM=False); any tensor fills the slot
    n, n_heads, dim = q.shape
    n_kv = k.shape[1]
    q_out = torch.empty(n, n_heads, dim, dtype=q.dtype, device=q.device)
    k_out = torch.empty(n, n_kv, dim, dtype=k.dtype, device=k.device)
    if n == 0:
        return q_out, k_out
    half = dim // 2
    block = triton.next_power_of_2(half)
    _qk_norm_rope_kernel[(n, n_heads + n_kv)](
        q, k, q_weight, k_weight, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_weight.stride(0), k_weight.stride(0), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        float(eps), H=n_heads, HKV=n_kv, D=dim, HALF=half, BLOCK=block, NORM=norm,
        num_warps=1 if block <= 128 else 4,
    )
    return q_out, k_out


@torch.library.custom_op("astrai::qk_norm_rope", mutates_args=())
def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (own weights) then RoPE on both: (q_out, k_out), contiguous.

    CUDA: the Triton kernel (one launch). Elsewhere: the model's torch math."""
    if q.device.type == "cuda" and triton is not None:
        return qk_norm_rope_triton(q, k, q_weight, k_weight, cos, sin, eps)
    check_qk_norm_rope_args(q, k, q_weight, k_weight, cos, sin)
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)


@qk_norm_rope.register_fake
def _qk_norm_rope_shape(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's eager rotary (apply_rope) of q and k, contiguous."""
    return apply_rope(q, cos, sin).contiguous(), apply_rope(k, cos, sin).contiguous()


@torch.library.custom_op("astrai::rope_qk", mutates_args=())
def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [N,H,D] and k [N,Hkv,D] for a model without QK-norm (Llama, Qwen2, Mistral):
    one launch on CUDA where apply_rope eagerly takes 7 per tensor; the torch math elsewhere.
    The kernel rotates in fp32 and rounds once; eager rounds x*cos, rotated*sin and the sum."""
    if q.device.type == "cuda" and triton is not None:
        return qk_norm_rope_triton(q, k, None, None, cos, sin, 0.0)
    check_qk_norm_rope_args(q, k, None, None, cos, sin)
    return rope_reference(q, k, cos, sin)


@rope_qk.register_fake
def _rope_qk_shape(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fused_qk(n: int, n_heads: int, n_kv: int, dim: int, dtype: torch.dtype, gen: torch.Generator,
              device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N,H,D] and k [N,Hkv,D] as the model makes them: column slices of one fused qkv."""
    qkv = torch.randn(n, (n_heads + 2 * n_kv) * dim, generator=gen).mul(3).to(device, dtype)
    q, k, _ = qkv.split([n_heads * dim, n_kv * dim, n_kv * dim], dim=1)
    return q.view(n, n_heads, dim), k.view(n, n_kv, dim)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits): 2^(exponent - 8)."""
    _, exponent = torch.frexp(x.float().abs())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


def selfcheck() -> None:
    """The Triton kernel (called directly, not through the op) against the torch formula.

    CPU (TRITON_INTERPRET=1): float32, max abs diff <= 1e-5 x the largest output. CUDA: bfloat16,
    (a) within one bf16 ulp (plus fp32 noise) of an fp32 reference, element by element: the
    kernel rounds once, from an fp32 value that differs from the reference's only by summation
    order and rsqrt's last bits, so it lands on the reference's rounding or its neighbour;
    (b) within 0.02 x the largest output of torch's bf16 eager formula: eager rounds five times
    (normed, * weight, * cos, * sin, sum), each <= 1/2 ulp of a value no larger than the largest
    |y| (cos^2 + sin^2 = 1), so about 3 ulps of it, and a bf16 ulp is <= 2^-7 of the value:
    3 x 2^-7 = 0.023 worst case, ~half that in practice; (c) no further from the fp32 reference
    than eager is. Each case cuts q and k from one fused qkv tensor (strided views) and checks
    the inputs are left alone.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    from astrai_train.model.layers import rope_tables

    # (N, H, Hkv, D, channels strided): the strided case has stride_d != 1 in q, k, cos and sin
    cases = [(1, 16, 8, 128, False), (5, 16, 8, 128, False), (5, 4, 4, 64, False), (3, 4, 2, 64, True)]
    if device == "cuda":
        cases += [(256, 16, 8, 128, False), (37, 24, 4, 64, False)]
    for n, n_heads, n_kv, dim, strided in cases:
        name = f"N={n} H={n_heads} Hkv={n_kv} D={dim}" + (" strided" if strided else "")
        if strided:                  # a fused [N, D, H + 2 Hkv] projection, heads innermost
            qkv = torch.randn(n, dim, n_heads + 2 * n_kv, generator=gen).mul(3).to(device, dtype)
            q, k = qkv[:, :, :n_heads].transpose(1, 2), qkv[:, :, n_heads:n_heads + n_kv].transpose(1, 2)
        else:
            q, k = _fused_qk(n, n_heads, n_kv, dim, dtype, gen, device)
        q_weight = (1 + 0.3 * torch.randn(dim, generator=gen)).to(device, dtype)
        k_weight = (1 + 0.3 * torch.randn(dim, generator=gen)).to(device, dtype)
        cos_table, sin_table = rope_tables(dim, 4096, 1e6)
        pos = torch.randint(0, 4096, (n,), generator=gen)
        cos, sin = cos_table[pos].to(device, dtype), sin_table[pos].to(device, dtype)
        if strided:                  # every other column of [N, 2D] tables
            cos = cos.repeat_interleave(2, dim=1)[:, ::2]
            sin = sin.repeat_interleave(2, dim=1)[:, ::2]
        before = (q.clone(), k.clone())
        got = qk_norm_rope_triton(q, k, q_weight, k_weight, cos, sin, 1e-6)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1]), f"{name}: inputs changed"
        eager = qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, 1e-6)
        exact = qk_norm_rope_reference(q.float(), k.float(), q_weight.float(), k_weight.float(),
                                       cos.float(), sin.float(), 1e-6)
        for which, g, e, x in zip("qk", got, eager, exact):
            assert g.shape == e.shape and g.dtype == dtype and g.is_contiguous(), f"{name} {which}: {g.shape}"
            scale = float(x.abs().max())
            err = float((g.float() - e.float()).abs().max())
            if dtype == torch.float32:
                assert err <= 1e-5 * scale, f"{name} {which}: max |kernel - torch| {err:.3g} (scale {scale:.3g})"
                continue
            err_exact = (g.float() - x).abs()
            assert bool((err_exact <= _bf16_ulp(x) + 1e-6 * scale).all()), \
                f"{name} {which}: more than 1 bf16 ulp from fp32 ({float(err_exact.max()):.3g})"
            assert err <= 0.02 * scale, f"{name} {which}: max |kernel - eager bf16| {err:.3g} (scale {scale:.3g})"
            eager_exact = float((e.float() - x).abs().max())
            assert float(err_exact.max()) <= eager_exact, \
                f"{name} {which}: kernel {float(err_exact.max()):.3g} vs eager {eager_exact:.3g} from fp32"
        # The rotary alone (NORM=False, models without QK-norm): one rounding, so within one
        # ulp of fp32 (of the input's scale: a rotation keeps it) and within eager's 3 roundings.
        got = qk_norm_rope_triton(q, k, None, None, cos, sin, 0.0)
        for which, g, x, c in zip("qk", got, rope_reference(q.float(), k.float(), cos.float(), sin.float()),
                                   rope_reference(q, k, cos, sin)):
            scale = float(x.abs().max())
            err = float((g.float() - x).abs().max())
            bound = 1e-5 * scale if dtype == torch.float32 else 2 ** -7 * scale
            assert g.is_contiguous() and err <= bound, f"{name} rope {which}: max |kernel - fp32| {err:.3g} > {bound:.3g}"
            assert err <= float((c.float() - x).abs().max()) + 1e-6 * scale, f"{name} rope {which}: worse than eager"
    print("qk_norm_rope: kernel == torch")


if __name__ == "__main__":
    selfcheck()
