"""Write a step's new keys and values into one layer's paged cache in ONE Triton launch.

Why: the torch way is two `index_copy_` launches per layer (keys, then values). In a CUDA-graph
decode step of qwen3-0.6b at batch 1 on an H200 those 56 launches were 128 of 1100 µs of GPU
time, 2.3 µs each, for a few KiB of data: the cost is the launch, not the bytes. One launch that
writes both halves the count.

Same contract as `reference.store_kv`: token i's key k[i] (and value v[i]) goes to slot
`slots[i]` of the layer's cache, cast to the cache dtype. k and v may be strided views (the
split of a fused qkv projection): their strides go to the kernel, nothing is copied first.
Slots are distinct except the padding rows of a CUDA graph, which all write the same reserved
slot; whichever identical write lands last wins.

Blocking: a cache row (one slot) is `n_kv * dim` contiguous elements, so a program owns a
[BLOCK_T tokens, BLOCK_C columns] tile of that flattened row for keys and the same tile for
values; grid = (cdiv(N, BLOCK_T), cdiv(max row width, BLOCK_C)). The grid and block sizes come
from shapes only (no host sync), so the store can be captured in a CUDA graph.

`python -m astrai_serve.kernels.triton_kv_store` (TRITON_INTERPRET=1 on a CPU) checks it
against the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from astrai_serve.kernels.reference import check_store_args
from astrai_serve.kernels.reference import store_kv as store_kv_reference

MAX_BLOCK_C = 1024       # columns per program: a whole qwen3-0.6b row (8 heads x 128)
TILE_ELEMENTS = 4096     # tokens x columns per program, per tensor (8 KiB of bf16 written)


@triton.jit
def _to_cache(x, ty: tl.constexpr):
    """x in the cache dtype. Into fp8 by way of fp32, clamped to e4m3's +-448: the fp32 -> e4m3
    conversion is the hardware's round-to-nearest-even, torch's cast; a direct bf16 -> e4m3 one
    may take another route (on the GPU its bytes differed from torch's cast)."""
    if ty.primitive_bitwidth == 8:
        x32 = x.to(tl.float32)
        return tl.minimum(tl.maximum(x32, -448.0), 448.0).to(ty)
    return x.to(ty)


# N (tokens this step) and S (a view into the step's packed metadata, aligned or not with the
# batch) are not specialised on: one compile serves every step (see triton_attention._METADATA).
@triton.jit(do_not_specialize=["N"], do_not_specialize_on_alignment=["S"])
def _store_kv_kernel(KC, VC, K, V, S, N,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     KD: tl.constexpr, VD: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr,
                     HAS_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    slot = tl.load(S + rows, mask=row_ok, other=0).to(tl.int64)
    t = rows.to(tl.int64)
    # Masks are built full-shaped [BLOCK_T, BLOCK_C] (Triton 3.9's interpreter refuses a mix of
    # a scalar and a vector). Column c of a cache row is head c // dim, channel c % dim.
    k_ok = row_ok[:, None] & (cols < KW)[None, :]
    k_src = t[:, None] * stride_kt + ((cols // KD) * stride_kh + (cols % KD) * stride_kd)[None, :]
    k = tl.load(K + k_src, mask=k_ok, other=0.0)
    tl.store(KC + slot[:, None] * KW + cols[None, :], _to_cache(k, KC.dtype.element_ty), mask=k_ok)
    if HAS_V:
        v_ok = row_ok[:, None] & (cols < VW)[None, :]
        v_src = t[:, None] * stride_vt + ((cols // VD) * stride_vh + (cols % VD) * stride_vd)[None, :]
        v = tl.load(V + v_src, mask=v_ok, other=0.0)
        tl.store(VC + slot[:, None] * VW + cols[None, :], _to_cache(v, VC.dtype.element_ty), mask=v_ok)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor | None, k: torch.Tensor,
             v: torch.Tensor | None, slots: torch.Tensor) -> None:
    """`reference.store_kv` in one launch: k [N, Hkv, Dk] (and v [N, Hkv, Dv]) into the slots
    `slots` [N] int64 of k_cache [P, page, Hkv, Dk] (and v_cache [P, page, Hkv, Dv]);
    v_cache and v are None for MLA."""
    check_store_args(k_cache, v_cache, k, v, slots)
    n, n_kv, k_dim = k.shape
    if n == 0:
        return
    has_v = v_cache is not None
    v_dim = v_cache.shape[3] if has_v else k_dim
    # Without values the V arguments repeat K's: the kernel never reads them (HAS_V is False).
    v_cache, v = (v_cache, v) if has_v else (k_cache, k)
    k_width, v_width = n_kv * k_dim, n_kv * v_dim
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(k_width, v_width)))
    block_t = max(1, TILE_ELEMENTS // block_c)
    grid = (triton.cdiv(n, block_t), triton.cdiv(max(k_width, v_width), block_c))
    _store_kv_kernel[grid](
        k_cache, v_cache, k, v, slots, n, k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), KD=k_dim, VD=v_dim, KW=k_width, VW=v_width,
        HAS_V=has_v, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
    )


def _fused_views(n: int, n_heads: int, n_kv: int, k_dim: int, v_dim: int, gen: torch.Generator,
                 device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v as the model makes them: column slices of one fused float32 qkv projection."""
    qkv = torch.randn(n, n_heads * k_dim + n_kv * (k_dim + v_dim), generator=gen).to(device)
    _, k, v = qkv.split([n_heads * k_dim, n_kv * k_dim, n_kv * v_dim], dim=1)
    return k.view(n, n_kv, k_dim), v.view(n, n_kv, v_dim)


def _toward_zero_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16 by dropping the low 16 bits, as Triton's interpreter casts."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _first_differences(got: list[torch.Tensor], want: list[torch.Tensor], count: int = 4) -> str:
    """Up to `count` differing elements per cache as (index, kernel value, reference value)."""
    parts = []
    for name, g, w in zip(("keys", "values"), got, want):
        g, w = g.float().flatten().cpu(), w.float().flatten().cpu()
        bad = ((g != w) & ~(g.isnan() & w.isnan())).nonzero().flatten()[:count].tolist()
        parts += [f"{name}[{i}] {g[i].item():g} vs {w[i].item():g}" for i in bad]
    return ", ".join(parts) or "(only NaN payloads differ)"


def selfcheck() -> None:
    """Kernel == reference, bit for bit, over whole caches (so stray writes fail too).

    One exception, on a CPU only: Triton's interpreter casts float32 -> bfloat16 toward zero
    (its cast passes no rounding mode) where the GPU, like torch, rounds to nearest even; there
    each written element must equal torch's rounding or the truncation.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)

    def stored(store, k_cache, v_cache, k, v, slots) -> list[torch.Tensor]:
        """The caches after `store` wrote into copies of them."""
        k_out, v_out = k_cache.clone(), None if v_cache is None else v_cache.clone()
        store(k_out, v_out, k, v, slots)
        return [k_out] if v_out is None else [k_out, v_out]

    def check(name: str, k_cache: torch.Tensor, v_cache: torch.Tensor | None, k: torch.Tensor,
              v: torch.Tensor | None, slots: torch.Tensor) -> None:
        got = stored(store_kv, k_cache, v_cache, k, v, slots)
        want = stored(store_kv_reference, k_cache, v_cache, k, v, slots)
        if device == "cpu" and k_cache.dtype == torch.bfloat16 and k.dtype == torch.float32:
            truncated = stored(store_kv_reference, k_cache, v_cache, _toward_zero_bf16(k),
                               None if v is None else _toward_zero_bf16(v), slots)
            ok = all(bool(((g == w) | (g == t)).all()) for g, w, t in zip(got, want, truncated))
        else:
            ok = all(torch.equal(g, w) for g, w in zip(got, want))
        assert ok, f"{name}: the kernel's caches differ from the reference's: {_first_differences(got, want)}"

    def caches(pages: int, page: int, n_kv: int, k_dim: int, v_dim: int | None, dtype: torch.dtype):
        def rand(dim: int) -> torch.Tensor:
            return torch.randn(pages, page, n_kv, dim, generator=gen).to(device, dtype)
        return rand(k_dim), None if v_dim is None else rand(v_dim)

    def distinct_slots(n: int, pages: int, page: int) -> torch.Tensor:
        return torch.randperm(pages * page, generator=gen)[:n].to(device)

    # GQA, float32 strided views of a fused projection cast into bf16 / fp16 caches; 37 tokens
    # span several programs, page size 1 too.
    for dtype, page in ((torch.bfloat16, 16), (torch.float16, 1)):
        k, v = _fused_views(37, 8, 4, 16, 16, gen, device)
        check(f"gqa_{str(dtype).removeprefix('torch.')}_page{page}", *caches(40 // page + 3, page, 4, 16, 16, dtype), k, v,
              distinct_slots(37, 40 // page + 3, page))
    # rows wider than a program's columns (3 x 400 keys, 3 x 200 values), channels strided
    # (stride_kd != 1), same dtype in and out
    k = torch.randn(5, 400, 3, generator=gen).to(device, torch.bfloat16).transpose(1, 2)
    v = torch.randn(5, 200, 3, generator=gen).to(device, torch.bfloat16).transpose(1, 2)
    check("wide_strided", *caches(2, 16, 3, 400, 200, torch.bfloat16), k, v, distinct_slots(5, 2, 16))
    # MLA: one head of [latent, rope], no value cache
    k = torch.randn(9, 1, 40, generator=gen).to(device)
    check("mla", *caches(4, 16, 1, 40, None, torch.bfloat16), k, None, distinct_slots(9, 4, 16))
    if device == "cuda":
        # An fp8 cache (EngineConfig.kv_cache_dtype="fp8"): bf16 projections rounded into e4m3,
        # values past its +-448 range included (both saturate). GPU only: the interpreter's
        # e4m3 cast is its own (1.97 -> 1.0, 500 -> 256), where the GPU's rounds to nearest.
        k, v = _fused_views(21, 8, 4, 16, 16, gen, device)
        k, v = k.to(torch.bfloat16) * 4, v.to(torch.bfloat16)
        k[3, 1, :4] = torch.tensor([500.0, -1000.0, 448.0, 1e-3], device=device)
        check("gqa_fp8", *caches(5, 16, 4, 16, 16, torch.float8_e4m3fn), k, v, distinct_slots(21, 5, 16))
        k = torch.randn(9, 1, 40, generator=gen).to(device, torch.bfloat16)
        check("mla_fp8", *caches(4, 16, 1, 40, None, torch.float8_e4m3fn), k, None, distinct_slots(9, 4, 16))
    # no tokens at all
    k, v = _fused_views(0, 4, 2, 16, 16, gen, device)
    check("empty", *caches(2, 16, 2, 16, 16, torch.bfloat16), k, v, distinct_slots(0, 2, 16))
    # a CUDA graph's padding rows: token 0's K/V written again and again to one reserved slot
    k, v = _fused_views(11, 4, 2, 16, 16, gen, device)
    k[5:], v[5:] = k[5:6].clone(), v[5:6].clone()
    slots = torch.cat([distinct_slots(5, 3, 16), torch.full((6,), 3 * 16, device=device)])
    check("padding", *caches(4, 16, 2, 16, 16, torch.bfloat16), k, v, slots)
    print("store_kv: kernel == reference")


if __name__ == "__main__":
    selfcheck()
