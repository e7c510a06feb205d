"""The projections of small captured decode batches through the Triton GEMV (triton_gemv.py).

`DecodeMatmul()` is a `linear(x, weight)` the engine hands to the model's `forward_flat` when it
captures the decode graphs of 1-4 sequences (EngineConfig.decode_gemv): x of at most 4 rows goes
through `torch.ops.astrai.gemv`, anything else through F.linear. The op is a torch custom op, so
the compiled decode (compile_decode) keeps it as one opaque call inside its graph; on a CPU it is
F.linear (same math), which lets the CPU tests run the same plumbing.

Why: bench/gemv.py on an H200 measured cuBLAS at 332-2,123 GB/s on qwen3-0.6b's batch-1 shapes
and this kernel at 1,293-2,519 GB/s; a step's matmuls 956 µs -> 536 µs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 4


@torch.library.custom_op("astrai::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
            num_stages: int) -> torch.Tensor:
    if x.device.type != "cuda":
        return F.linear(x, w)
    from astrai_serve.kernels.triton_gemv import GemvConfig, gemv

    return gemv(x.contiguous(), w, GemvConfig(block_n, block_k, num_warps, num_stages))


@gemv_op.register_fake
def _gemv_shape(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, num_warps: int,
                num_stages: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def gemv_config(n: int, k: int) -> tuple[int, int, int, int]:
    """(block_n, block_k, num_warps, num_stages) for a weight [n, k]: two rows per program and
    K in one or two tiles won on four of qwen3-0.6b's five shapes (bench/gemv.py, H200); the
    fused qkv did best with eight rows over eight warps."""
    if n == 4096 and k == 1024:
        return 8, 1024, 8, 3
    return 2, min(2048, 1 << (k - 1).bit_length()), 4, 3


class DecodeMatmul:
    """linear(x, w): the GEMV for 1..MAX_ROWS rows of x and a weight contiguous in K, else F.linear."""

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= MAX_ROWS and w.dim() == 2 and w.stride(1) == 1:
            return gemv_op(x, w, *gemv_config(w.shape[0], w.shape[1]))
        return F.linear(x, w)
