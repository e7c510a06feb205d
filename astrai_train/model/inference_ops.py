"""The kernels `forward_flat` runs besides attention, as one object a serving engine can replace.

`InferenceOps` is plain torch: every projection through F.linear, the SwiGLU activation and the
QK-norm + rotary as the training forward computes them. A serving engine hands `forward_flat` a
subclass with faster kernels for the shapes where launches dominate (batch-1 decode in a CUDA
graph: astrai_serve/kernels/decode_matmul.py's DecodeOps), so the model keeps one description of
its math and the engine picks the kernels.

The entry points are where a step's launches can be merged:
- `add_rms_norm(x, residual, norm)`: the residual add and the RMSNorm after it (eagerly ~8
  kernels for the norm and one for the add; one fused kernel can do both).
- `linear(x, w)`: every projection (y = x @ w.T, no bias).
- `silu_mul_linear(gate_up, w)`: the down projection of SwiGLU from the fused gate|up output; a
  kernel can compute silu(gate) * up as it loads its input instead of in a launch of its own.
- `qk_norm_rope(q, k, q_norm, k_norm, cos, sin)`: per-head RMSNorm of queries and keys, then
  rotary; one launch for both instead of one each.
- `moe(x, router, gate_up, down, top_k, normalize)`: a mixture-of-experts MLP (moe.py): the
  router, then every expert's matmuls. Here the grouped torch reference (one host sync a layer
  for the expert sizes) or, while a CUDA graph is being captured, every expert on every token;
  a kernel does each projection of all experts in one grouped GEMM launch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layers import RMSNorm, apply_rope
from .moe import experts_dense, experts_reference, route


class InferenceOps:
    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None: (norm(x), x)."""
        residual = x if residual is None else x + residual
        return norm(residual), residual

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def silu_mul_linear(self, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.linear(F.silu(gate) * up, w)

    def qk_norm_rope(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [N, H, D], k [N, Hkv, D] -> normalised (when the model has QK-norm) and rotated."""
        if q_norm is not None:
            q, k = q_norm(q), k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def moe(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            top_k: int, normalize: bool) -> torch.Tensor:
        """x [N, D] through the experts (router [E, D], gate_up [E, 2I, D], down [E, D, I]) -> [N, D]."""
        weights, ids = route(self.linear(x, router), top_k, normalize)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return experts_dense(x, gate_up, down, weights, ids)   # the reference reads sizes back
        return experts_reference(x, gate_up, down, weights, ids)


TORCH_OPS = InferenceOps()
