"""One layer's K/V store + paged attention as a torch custom op, for the compiled decode.

Why: torch.compile must not trace the attention (its Triton kernels and cache writes are not for
the compiler). Hiding the call behind `torch.compiler.disable` broke each layer into four graphs
(a break splits the frame it happens in and every frame above it), and Inductor cannot fuse
across a break: a batch-1 decode step of qwen3-0.6b on an H200 ran the residual add after each
MLP as a launch of its own (28 x ~1 µs) because the next layer's RMSNorm sat in another graph.
As a custom op the call is one opaque node and the whole forward is one graph.

The op declares what it writes (the layer's slice of both caches, passed as the whole
[n_layers, ...] tensors plus the layer index), so the compiler orders it correctly; Inductor
then calls it on the caches in place (no functional copy of the cache: checked by
tests/test_engine_runner.py's compiled-forward test).

Only the two named kernels ("torch", "triton") can go through the op, since its arguments must
be tensors and plain values; anything else (a test's wrapper) keeps the graph break.
"""
from __future__ import annotations

import torch

from astrai_serve.kernels import get_attention_impl, get_store_impl_for, impl_name

from .paged_attention import PagedAttention


@torch.library.custom_op("astrai::paged_attend", mutates_args=("k_cache", "v_cache"))
def paged_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, k_cache: torch.Tensor,
                 v_cache: torch.Tensor | None, layer: int, slot_mapping: torch.Tensor,
                 page_table: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                 cascade: torch.Tensor | None, scale: float, v_dim: int, impl: str) -> torch.Tensor:
    kernel = get_attention_impl(impl)
    k_layer = k_cache[layer]
    v_layer = None if v_cache is None else v_cache[layer]
    get_store_impl_for(kernel)(k_layer, v_layer, k, None if v_layer is None else v, slot_mapping)
    hint = {} if cascade is None else {"cascade": cascade}
    return kernel(q, k_layer, v_layer, page_table, cu_seqlens_q, context_lens, scale, v_dim, **hint)


@paged_attend.register_fake
def _paged_attend_shape(q, k, v, k_cache, v_cache, layer, slot_mapping, page_table, cu_seqlens_q,
                        context_lens, cascade, scale, v_dim, impl) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


class CompiledAttention(PagedAttention):
    """PagedAttention for a torch.compile'd forward: attend is the custom op above when the
    kernel has a name, else the same call behind a graph break."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.impl = impl_name(self.kernel)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        if self.impl is None:
            return _attend_behind_break(self, layer, q, k, v, scale)
        if self.cache.v is not None and v is None:
            raise ValueError("the model gave no values but the KV layout stores them")
        meta = self.meta
        return paged_attend(q, k, v, self.cache.k, self.cache.v, layer, meta.slot_mapping, meta.page_table,
                            meta.cu_seqlens_q, meta.context_lens, meta.cascade, scale,
                            self.cache.layout.v_dim, self.impl)


_attend_behind_break = torch.compiler.disable(PagedAttention.attend)
