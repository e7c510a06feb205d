"""Attention over the paged KV cache: a torch reference (CPU, and the oracle) and Triton GPU kernels.

Every implementation has the signature of `reference.paged_attention`; pick one by name with
`get_attention_impl`. The Triton module is imported only when asked for, so CPU-only installs
never need Triton. Contract for callers: every sequence in a batch has at least one query row
(the Triton path treats N == S as a pure decode batch), and the new tokens' K/V are already in
the cache. The Triton path does no host sync and launches a grid fixed by shapes, so a decode
step that calls it can be captured in a CUDA graph. Each kernel has a K/V store that writes a
step's new keys and values into the cache before it runs (`get_store_impl_for`).
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from astrai_serve.kernels.gumbel import gumbel_argmax_reference
from astrai_serve.kernels.reference import paged_attention, store_kv

PagedAttentionFn = Callable[..., torch.Tensor]
StoreKVFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor], None]

IMPLS = ("torch", "triton")


def get_attention_impl(name: str) -> PagedAttentionFn:
    """The paged-attention function called `name` ("torch" or "triton")."""
    if name == "torch":
        return paged_attention
    if name == "triton":
        try:
            from astrai_serve.kernels.triton_attention import paged_attention as triton_paged_attention
        except ImportError as err:
            raise ValueError(f"attention impl 'triton' needs the triton package: {err}") from err
        return triton_paged_attention
    raise ValueError(f"unknown attention impl {name!r}; choose one of {', '.join(IMPLS)}")


def get_store_impl_for(kernel: PagedAttentionFn) -> StoreKVFn:
    """The K/V store (signature of `reference.store_kv`) that goes with a paged-attention function.

    The Triton kernel gets the Triton store: one launch per layer for keys and values, where the
    torch store's two `index_copy_` launches were ~12% of a CUDA-graph decode step's GPU time at
    batch 1. Chosen from the kernel, not from a name, because the engine hands PagedAttention only
    the kernel. Anything else (the torch reference, a test's wrapper) gets the torch store, which
    runs on every device.
    """
    # triton_attention is in sys.modules whenever `kernel` can be its function, so looking it up
    # there never imports Triton for the torch path.
    triton_attention = sys.modules.get("astrai_serve.kernels.triton_attention")
    if triton_attention is not None and kernel is triton_attention.paged_attention:
        from astrai_serve.kernels.triton_kv_store import store_kv as triton_store_kv
        return triton_store_kv
    return store_kv


def gumbel_argmax(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [S]: per row argmax(x / T + Gumbel noise), argmax(x) where T <= 0 (gumbel.py): one
    Triton kernel on CUDA (triton_sampling.py), the torch reference elsewhere."""
    if x.device.type == "cuda":
        from astrai_serve.kernels.triton_sampling import gumbel_argmax as triton_gumbel_argmax

        return triton_gumbel_argmax(x, temps, keys)
    return gumbel_argmax_reference(x, temps, keys)


__all__ = ["gumbel_argmax", "paged_attention", "store_kv", "get_attention_impl", "get_store_impl_for", "IMPLS",
           "PagedAttentionFn", "StoreKVFn"]
