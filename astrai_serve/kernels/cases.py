"""Random paged-attention inputs with their contiguous twins, for tests and benchmarks.

A case scatters each sequence's contiguous K/V into randomly chosen (shuffled, non-adjacent)
pages of a shared pool, so an implementation that reads the wrong page or slot gets a wrong
answer. `dense_attention` answers the same question from the contiguous tensors with torch's
SDPA, independently of any page arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedCase:
    """One layer's paged inputs plus the contiguous per-sequence K/V they were built from."""

    q: torch.Tensor                  # [N, Hq, Dk] queries of the new tokens
    k_cache: torch.Tensor            # [P, page, Hkv, Dk] key pages
    v_cache: torch.Tensor | None     # [P, page, Hkv, Dv] value pages; None when the value is in the key
    page_table: torch.Tensor         # [S, maxp] int32 page ids per sequence (unused tail = 0)
    cu_seqlens_q: torch.Tensor       # [S+1] int32 query row offsets
    context_lens: torch.Tensor       # [S] int32 tokens in each context, new ones included
    scale: float                     # softmax scale
    v_dim: int                       # value channels
    keys: list[torch.Tensor]         # per sequence [ctx, Hkv, Dk] contiguous keys
    values: list[torch.Tensor]       # per sequence [ctx, Hkv, Dv] contiguous values

    def args(self) -> tuple:
        """Positional arguments for `paged_attention(*case.args())`."""
        return (self.q, self.k_cache, self.v_cache, self.page_table, self.cu_seqlens_q,
                self.context_lens, self.scale, self.v_dim)


def make_case(ctx_lens: list[int], q_lens: list[int], n_heads: int, n_kv: int, k_dim: int,
              v_dim: int, page_size: int, value_in_key: bool = False, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", seed: int = 0, spare_pages: int = 3,
              shared_prefix: int = 0, prefix_groups: list[int] | None = None) -> PagedCase:
    """A random case: sequence s has ctx_lens[s] cached tokens, the last q_lens[s] of them queried.
    The first `shared_prefix` tokens (whole pages) are the same tokens in the same pages for all
    sequences of one prefix group (prefix_groups[s]; None: one group for all)."""
    if len(ctx_lens) != len(q_lens) or any(ql > c for ql, c in zip(q_lens, ctx_lens)):
        raise ValueError(f"bad case: ctx_lens={ctx_lens} q_lens={q_lens}")
    if shared_prefix % page_size or any(c <= shared_prefix for c in ctx_lens):
        raise ValueError(f"bad case: shared_prefix={shared_prefix} must be whole pages below every context")
    gen = torch.Generator().manual_seed(seed)
    n_shared = shared_prefix // page_size
    groups = prefix_groups if prefix_groups is not None else [0] * len(ctx_lens)
    pages_per_seq = [(c + page_size - 1) // page_size - n_shared for c in ctx_lens]
    n_pages = sum(pages_per_seq) + n_shared * len(set(groups)) + spare_pages
    order = torch.randperm(n_pages, generator=gen).tolist()
    max_pages = max(max(pages_per_seq), 1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    k_cache = rand(n_pages, page_size, n_kv, k_dim)
    v_cache = None if value_in_key else rand(n_pages, page_size, n_kv, v_dim)
    page_table = torch.zeros(len(ctx_lens), max_pages + n_shared, dtype=torch.int32)
    keys, values = [], []
    prefixes = {}                                  # group -> (pages, keys, values)
    for g in dict.fromkeys(groups):
        shared_k = rand(shared_prefix, n_kv, k_dim)
        shared_v = shared_k[..., :v_dim] if value_in_key else rand(shared_prefix, n_kv, v_dim)
        prefixes[g] = ([order.pop() for _ in range(n_shared)], shared_k, shared_v)
    for s, ctx in enumerate(ctx_lens):
        shared_pages, shared_k, shared_v = prefixes[groups[s]]
        mine = shared_pages + [order.pop() for _ in range(pages_per_seq[s])]
        page_table[s, :len(mine)] = torch.tensor(mine, dtype=torch.int32)
        k = torch.cat([shared_k, rand(ctx - shared_prefix, n_kv, k_dim)])
        v = k[..., :v_dim] if value_in_key else torch.cat([shared_v, rand(ctx - shared_prefix, n_kv, v_dim)])
        t = torch.arange(ctx)
        page_of = torch.tensor(mine, dtype=torch.long)[t // page_size]
        k_cache[page_of, t % page_size] = k
        if v_cache is not None:
            v_cache[page_of, t % page_size] = v
        keys.append(k.to(device))
        values.append(v.to(device))
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = rand(int(cu[-1]), n_heads, k_dim)
    return PagedCase(q.to(device), k_cache.to(device), None if v_cache is None else v_cache.to(device),
                     page_table.to(device), cu.to(device),
                     torch.tensor(ctx_lens, dtype=torch.int32, device=device), k_dim ** -0.5, v_dim,
                     keys, values)


def dense_attention(case: PagedCase) -> torch.Tensor:
    """The same attention from contiguous K/V with SDPA and an explicit bottom-right causal mask (fp32)."""
    outs = []
    cu = case.cu_seqlens_q.tolist()
    n_heads, n_kv = case.q.shape[1], case.k_cache.shape[2]
    for s, (k, v) in enumerate(zip(case.keys, case.values)):
        q = case.q[cu[s]:cu[s + 1]].float().transpose(0, 1)                     # [Hq, q_len, Dk]
        q_len, ctx = q.shape[1], k.shape[0]
        k = k.float().transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)     # [Hq, ctx, Dk]
        v = v.float().transpose(0, 1).repeat_interleave(n_heads // n_kv, 0)     # [Hq, ctx, Dv]
        mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=case.scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs, 0)


def patch_triton_interpreter() -> None:
    """Let TRITON_INTERPRET=1 run loops whose bounds were loaded from memory, under numpy >= 2.

    The interpreter turns a scalar into a Python int with `int(array)`, but its scalars are
    1-element arrays and numpy 2 refuses that conversion. Compiled (GPU) runs never take this
    path; this only matters for developing and testing the kernels on a CPU.
    """
    import triton.runtime.interpreter as interpreter

    if getattr(interpreter, "_astrai_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._astrai_patched = True
