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
