"""Attention over the paged KV cache: a torch reference (CPU, and the oracle) and Triton GPU kernels.

Every implementation has the signature of `reference.paged_attention`; pick one by name with
`get_attention_impl`. The Triton module is imported only when asked for, so CPU-only installs
never need Triton. Contract for callers: every sequence in a batch has at least one query row
(the Triton path treats N == S as a pure decode batch), and the new tokens' K/V are already in
the cache. The Triton path does no host sync and launches a grid fixed by shapes, so a decode
step that calls it can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Callable

import torch

from astrai_serve.kernels.reference import paged_attention

PagedAttentionFn = Callable[..., torch.Tensor]

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


__all__ = ["paged_attention", "get_attention_impl", "IMPLS", "PagedAttentionFn"]
