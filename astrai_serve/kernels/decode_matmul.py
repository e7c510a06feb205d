"""The kernels of small captured decode batches: Triton GEMVs (triton_gemv.py) and the fused QK-norm.

`DecodeOps()` is the `ops` (astrai_train.model.inference_ops) the engine hands to the model's
`forward_flat` when it captures the decode graphs of 1-4 sequences (EngineConfig.decode_gemv):
projections of x with at most 4 rows go through `torch.ops.astrai.gemv`, anything else through
F.linear. The ops are torch custom ops, so the compiled decode (compile_decode) keeps each as one
opaque call inside its graph; on a CPU they are torch math, which lets the CPU tests run the
same plumbing.

Why: bench/gemv.py on an H200 measured cuBLAS at 332-2,123 GB/s on qwen3-0.6b's batch-1 shapes
and this kernel at 1,293-2,519 GB/s; a step's matmuls 956 µs -> 536 µs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from astrai_serve.kernels.fused_ops import FusedOps

MAX_ROWS = 4


@torch.library.custom_op("astrai::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
            num_stages: int, pdl: bool = False) -> torch.Tensor:
    if x.device.type != "cuda":
        return F.linear(x, w)  # no launch, so nothing for pdl to change
    from astrai_serve.kernels.triton_gemv import GemvConfig, gemv

    return gemv(x.contiguous(), w, GemvConfig(block_n, block_k, num_warps, num_stages), pdl=pdl)


@gemv_op.register_fake
def _gemv_shape(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                num_stages: int, pdl: bool = False) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("astrai::gemv_silu_mul", mutates_args=())
def gemv_silu_mul_op(gate_up: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                     num_stages: int, pdl: bool = False) -> torch.Tensor:
    """F.linear(F.silu(gate) * up, w) for gate_up = [gate | up] [M, 2K], w [N, K]: SwiGLU's down
    projection with the activation computed as the GEMV loads its input (one launch, not two)."""
    if gate_up.device.type != "cuda":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w)
    from astrai_serve.kernels.triton_gemv import GemvConfig, gemv_silu_mul

    return gemv_silu_mul(gate_up.contiguous(), w, GemvConfig(block_n, block_k, num_warps, num_stages), pdl=pdl)


@gemv_silu_mul_op.register_fake
def _gemv_silu_mul_shape(gate_up: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                         num_stages: int, pdl: bool = False) -> torch.Tensor:
    return gate_up.new_empty(gate_up.shape[0], w.shape[0])


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for a weight [n, k]: two rows per program and
    K in one or two tiles won on four of qwen3-0.6b's five shapes (bench/gemv.py, H200); the
    fused qkv did best with eight rows over eight warps."""
    if n == 4096 and k == 1024:
        return 8, 1024, 8, 3
    return 2, min(2048, 1 << (k - 1).bit_length()), 4, 3


class DecodeOps(FusedOps):
    """The model's inference kernels for graphed decodes of 1..MAX_ROWS sequences (EngineConfig.decode_gemv):

    - linear: the GEMV for x of at most MAX_ROWS rows and a weight contiguous in K, else F.linear;
    - silu_mul_linear: SwiGLU's down projection with silu(gate) * up computed as the GEMV loads
      its input (one launch instead of two);
    - the fused norms, activation and QK-norm + rotary of FusedOps (fused_ops.py) otherwise.

    pdl: launch the GEMVs with programmatic dependent launch (each reads its first weight tile
    while the kernel before it finishes; Hopper or later, triton_gemv.pdl_supported). On a CPU
    every op is its torch math, which lets the CPU tests run the same plumbing.
    """

    def __init__(self, pdl: bool = False) -> None:
        self.pdl = pdl

    @staticmethod
    def _takes(x: torch.Tensor, w: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= MAX_ROWS and w.dim() == 2 and w.stride(1) == 1

    def linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._takes(x, w):
            return gemv_op(x, w, *gemv_config(w.shape[0], w.shape[1]), pdl=self.pdl)
        return F.linear(x, w)

    def silu_mul_linear(self, gate_up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """F.linear(F.silu(gate) * up, w) with gate, up = gate_up.chunk(2, -1) (gemv_config keyed on
        w's [n, k], like any product with w)."""
        if gate_up.shape[-1] != 2 * w.shape[-1]:
            raise ValueError(f"silu_mul_linear takes gate_up [..., 2K] and w [N, K]; got {tuple(gate_up.shape)} "
                             f"and {tuple(w.shape)}")
        if self._takes(gate_up, w):
            return gemv_silu_mul_op(gate_up, w, *gemv_config(w.shape[0], w.shape[1]), pdl=self.pdl)
        return super().silu_mul_linear(gate_up, w)

