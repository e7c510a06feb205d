"""The paged KV storage and the AttentionBackend that the model calls once per layer.

Storage is ONE preallocated tensor per kind for all layers:
    k_cache [n_layers, num_pages, page_size, n_kv, k_dim]
    v_cache [n_layers, num_pages, page_size, n_kv, v_dim]   (None for MLA: the value is in the key)
so a layer's cache is a contiguous slice and a token's slot is `page * page_size + offset`.

`PagedAttention` carries one step's metadata (built by the ModelRunner) and implements
`attend(layer, q, k, v, scale)`: write the new tokens' K/V at their slots (with the store that
goes with the kernel, `kernels.get_store_impl_for`), then run the paged attention kernel over each
sequence's whole context. No state survives the step but the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from astrai_serve.kernels import PagedAttentionFn, get_store_impl_for
from astrai_train.model import KVLayout


class PagedKVCache:
    def __init__(self, layout: KVLayout, n_layers: int, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.layout = layout
        self.num_pages = num_pages
        self.page_size = page_size
        shape = (n_layers, num_pages, page_size, layout.n_kv)
        self.k = torch.zeros(*shape, layout.k_dim, dtype=dtype, device=device)
        self.v = None if layout.value_in_key else torch.zeros(*shape, layout.v_dim, dtype=dtype, device=device)

    @staticmethod
    def pages_for_budget(budget_bytes: int, layout: KVLayout, n_layers: int, page_size: int,
                         dtype: torch.dtype) -> int:
        return budget_bytes // (layout.bytes_per_token(n_layers, dtype) * page_size)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (self.v.nbytes if self.v is not None else 0)


@dataclass(frozen=True)
class StepMetadata:
    """Where one step's N new tokens of S sequences live and what they see (all on the device)."""

    slot_mapping: torch.Tensor   # [N] int64: cache slot of each new token
    page_table: torch.Tensor     # [S, max_pages] int32: pages of each sequence (padded with 0)
    cu_seqlens_q: torch.Tensor   # [S+1] int32: rows of q belonging to each sequence
    context_lens: torch.Tensor   # [S] int32: tokens of context (cached + new) per sequence
    # (decode only) the cascade plan, kernels/cascade.py: which sequences hold a prefix in the same
    # pages (a prefix-cache hit they share), so the kernel attends to it once per chunk; None: no hint
    cascade: torch.Tensor | None = None


class PagedAttention:
    """AttentionBackend over a PagedKVCache for one step (see astrai_train/model/backend.py)."""

    def __init__(self, cache: PagedKVCache, meta: StepMetadata, kernel: PagedAttentionFn) -> None:
        self.cache = cache
        self.meta = meta
        self.kernel = kernel
        # The K/V writes follow the kernel: the Triton kernel's store writes keys and values in
        # one launch per layer, the torch kernel's is two index_copy_ (kernels/__init__.py).
        self.store = get_store_impl_for(kernel)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        layout, meta = self.cache.layout, self.meta
        k_cache, v_cache = self.cache.k[layer], None
        if self.cache.v is None:
            v = None                        # MLA: the value is inside the key, stored with it
        elif v is None:
            raise ValueError("the model gave no values but the KV layout stores them")
        else:
            v_cache = self.cache.v[layer]
        self.store(k_cache, v_cache, k, v, meta.slot_mapping)
        hint = {} if meta.cascade is None else {"cascade": meta.cascade}
        return self.kernel(q, k_cache, v_cache, meta.page_table, meta.cu_seqlens_q, meta.context_lens,
                           scale, layout.v_dim, **hint)
