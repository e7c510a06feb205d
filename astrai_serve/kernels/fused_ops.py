"""FusedOps: the model's inference kernels with the elementwise chains fused, for every step shape.

`forward_flat` (astrai_train.model) runs its norms, activation and rotary through an `ops`
object (inference_ops.InferenceOps). Plain torch spends ~57 kernels per Qwen3 layer on them:
8 per RMSNorm (upcast, square, mean, add eps, rsqrt, scale, downcast, weight) plus its residual
add, 8 each for the q and k norms, 7 each for the two rotaries, 2 for silu(gate) * up. At
decode batch sizes every one of those is a launch of a few µs over a few KB, so an uncompiled
decode step of qwen3-0.6b is ~1,600 launches and replays in 4-6 ms even as a CUDA graph, where
torch.compile fuses them and the same graph replays ~3x faster (W1, H100: 6.2k against 20k
output tok/s). These ops do the fusion by hand, so the uncompiled paths (`enforce_eager`,
graphs without compile, the prefill steps) run ~10 kernels per layer:

    add_rms_norm   residual add + RMSNorm in one launch (triton_norm.py), twice a layer
    qk_norm_rope   q and k norms and both rotaries in one launch (triton_qk_norm_rope.py);
                   without QK-norm (Llama) the two rotaries in one launch (rope_qk)
    silu_mul       silu(gate) * up in one launch (triton_norm.py), then the down projection
    moe            a mixture-of-experts MLP: the router and its top-k in torch, then every
                   expert's gate|up (silu * up in its epilogue) and every expert's down as two
                   grouped-GEMM launches over tokens sorted by expert (triton_moe.py)

Projections stay cuBLAS (F.linear); DecodeOps (decode_matmul.py) overrides `linear` with the
Triton GEMV for the graphed decodes of 1-4 sequences. Each op is a torch custom op, so a
compiled forward keeps it as one opaque node, and on a CPU its body is the torch formula: the
CPU tests run the same plumbing.
"""
from __future__ import annotations

import torch

from astrai_serve.kernels.triton_moe import moe_experts
from astrai_serve.kernels.triton_norm import add_rms_norm, silu_mul
from astrai_serve.kernels.triton_qk_norm_rope import qk_norm_rope, rope_qk
from astrai_train.model.inference_ops import InferenceOps
from astrai_train.model.layers import RMSNorm
from astrai_train.model.moe import route


class FusedOps(InferenceOps):
    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, norm.weight, norm.eps)

    def silu_mul_linear(self, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.linear(silu_mul(gate_up), w)

    def qk_norm_rope(self, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm | None, k_norm: RMSNorm | None,
                     cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if q_norm is None:       # (Llama: the rotary alone, same kernel)
            return rope_qk(q, k, cos, sin)
        return qk_norm_rope(q, k, q_norm.weight, k_norm.weight, cos, sin, q_norm.eps)

    def moe(self, x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            top_k: int, normalize: bool) -> torch.Tensor:
        weights, ids = route(self.linear(x, router), top_k, normalize)
        return moe_experts(x, gate_up, down, weights, ids)


FUSED_OPS = FusedOps()
