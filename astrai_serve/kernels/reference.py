"""Attention over a paged KV cache, in plain torch: the CPU path and the oracle for the GPU kernels.

Storage layout (one layer): `k_cache[P, page, Hkv, Dk]` and `v_cache[P, page, Hkv, Dv]` hold P
pages of `page` token slots each. Token t of sequence s lives in page `page_table[s, t // page]`
at slot `t % page`. The flattened batch holds, for each sequence s, its q_len newest tokens
(rows `cu_seqlens_q[s]:cu_seqlens_q[s+1]` of q); they are the LAST q_len positions of a context
of `context_lens[s]` tokens whose keys/values are already in the cache, so query i of s sits at
position `context_lens[s] - q_len + i` and sees keys 0..that position.

GQA: query head h reads kv head `h // (Hq // Hkv)`. `v_cache=None` is the MLA absorbed form: the
cache stores one "head" of [latent, rope key] per token and the value is `key[..., :v_dim]`.

This file is written to be obviously right, not fast: one sequence at a time, gathered into a
contiguous context, softmax in fp32.
"""
from __future__ import annotations

import torch

from astrai_serve.kernels.cascade import check_cascade, max_chunk_seqs


def check_paged_args(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                     page_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     context_lens: torch.Tensor, v_dim: int) -> None:
    """Shape checks shared by every implementation (no device reads, so no host sync)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [N,Hq,Dk] and k_cache [P,page,Hkv,Dk]; got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    n_heads, k_dim = q.shape[1], q.shape[2]
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != k_dim:
        raise ValueError(f"q has Dk={k_dim} but k_cache has Dk={k_cache.shape[3]}")
    if n_kv == 0 or n_heads % n_kv != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv})")
    if v_cache is None:
        if not 0 < v_dim <= k_dim:
            raise ValueError(f"v_dim={v_dim} must be in 1..Dk={k_dim} when the value lives in the key")
    elif v_cache.shape[:3] != k_cache.shape[:3] or v_cache.shape[3] != v_dim:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not match k_cache "
                         f"{tuple(k_cache.shape)} with v_dim={v_dim}")
    n_seqs = context_lens.shape[0]
    if page_table.dim() != 2 or page_table.shape[0] != n_seqs or cu_seqlens_q.shape[0] != n_seqs + 1:
        raise ValueError(f"page_table {tuple(page_table.shape)}, cu_seqlens_q "
                         f"{tuple(cu_seqlens_q.shape)} and context_lens {tuple(context_lens.shape)} "
                         "disagree on the number of sequences")


def check_store_args(k_cache: torch.Tensor, v_cache: torch.Tensor | None, k: torch.Tensor,
                     v: torch.Tensor | None, slots: torch.Tensor) -> None:
    """Shape and dtype checks shared by every K/V store (no device reads, so no host sync; kept to
    a few µs since they run once per layer of every eager step)."""
    if k_cache.dim() != 4 or k.dim() != 3 or k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(f"k must be [N,Hkv,Dk] for k_cache [P,page,Hkv,Dk]; got k {tuple(k.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    if (v_cache is None) != (v is None):
        raise ValueError(f"values and value cache go together: got v {'None' if v is None else tuple(v.shape)} "
                         f"and v_cache {'None' if v_cache is None else tuple(v_cache.shape)}")
    if v_cache is not None:
        if v_cache.dim() != 4 or v_cache.shape[:3] != k_cache.shape[:3] \
                or v.shape != (k.shape[0], k.shape[1], v_cache.shape[3]):
            raise ValueError(f"v {tuple(v.shape)} and v_cache {tuple(v_cache.shape)} do not match "
                             f"k {tuple(k.shape)} and k_cache {tuple(k_cache.shape)}")
        if v_cache.dtype != k_cache.dtype:
            raise ValueError(f"k_cache and v_cache must share a dtype; got {k_cache.dtype} and {v_cache.dtype}")
        if not v.is_floating_point():
            raise ValueError(f"v must be floating point; got {v.dtype}")
        if not v_cache.is_contiguous():
            raise ValueError("v_cache must be contiguous (a layer's slice of PagedKVCache is)")
    if not k.is_floating_point():
        raise ValueError(f"k must be floating point; got {k.dtype}")
    if not k_cache.is_contiguous():
        raise ValueError("k_cache must be contiguous (a layer's slice of PagedKVCache is)")
    if slots.shape != (k.shape[0],) or slots.dtype != torch.int64:
        raise ValueError(f"slots must be int64 [N] with N={k.shape[0]} (rows of k); got {slots.dtype} "
                         f"{tuple(slots.shape)}")


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor | None, k: torch.Tensor,
             v: torch.Tensor | None, slots: torch.Tensor) -> None:
    """Write token i's key (and value) into slot `slots[i]` (= page * page_size + offset) of the
    layer's caches, cast to the cache dtype. v_cache and v are None for MLA (the value is in the key)."""
    check_store_args(k_cache, v_cache, k, v, slots)
    n_kv = k_cache.shape[2]
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache is None:
            continue
        if cache.element_size() == 1:
            # float8: saturate to the finite range first. torch's CPU cast saturates and its CUDA
            # cast may not (an overflow there is NaN, which would poison every later attention
            # over this slot); the Triton store saturates, so the oracle says so explicitly.
            top = torch.finfo(cache.dtype).max
            new = new.float().clamp(-top, top).to(cache.dtype)
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)  # index_copy_ has no fp8 kernel
        else:
            new = new.to(cache.dtype)
        cache.view(-1, n_kv, cache.shape[3]).index_copy_(0, slots, new)


def gather_context(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` token slots of one sequence as a contiguous [length, H, D] tensor."""
    page_size = cache.shape[1]
    n_pages = (length + page_size - 1) // page_size
    return cache[pages[:n_pages].long()].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None,
                    page_table: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, v_dim: int,
                    cascade: torch.Tensor | None = None) -> torch.Tensor:
    """out[N, Hq, v_dim]: each query attends causally to its sequence's cached context.

    cascade is the GPU kernels' plan for prefixes that sequences hold in the same pages
    (kernels/cascade.py); the answer does not depend on it, so here it is only checked to be true.
    """
    check_paged_args(q, k_cache, v_cache, page_table, cu_seqlens_q, context_lens, v_dim)
    if cascade is not None:
        check_cascade(cascade, page_table, context_lens, k_cache.shape[1],
                      max_chunk_seqs(q.shape[1] // k_cache.shape[2], q.shape[2]))
    n_tokens, n_heads, _ = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty(n_tokens, n_heads, v_dim, dtype=q.dtype, device=q.device)
    starts = cu_seqlens_q.tolist()
    lengths = context_lens.tolist()
    for s, ctx in enumerate(lengths):
        lo, hi = starts[s], starts[s + 1]
        q_len = hi - lo
        if q_len == 0:
            continue
        if q_len > ctx:
            raise ValueError(f"sequence {s} has {q_len} queries but a context of only {ctx} tokens")
        keys = gather_context(k_cache, page_table[s], ctx).float()           # [ctx, Hkv, Dk]
        if v_cache is None:
            values = keys[..., :v_dim]
        else:
            values = gather_context(v_cache, page_table[s], ctx).float()     # [ctx, Hkv, Dv]
        keys = keys.repeat_interleave(group, dim=1)                           # [ctx, Hq, Dk]
        values = values.repeat_interleave(group, dim=1)                       # [ctx, Hq, Dv]
        qs = q[lo:hi].float()                                                 # [q_len, Hq, Dk]
        scores = torch.einsum("qhd,khd->hqk", qs, keys) * scale               # [Hq, q_len, ctx]
        q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
        k_pos = torch.arange(ctx, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]                            # [q_len, ctx]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
