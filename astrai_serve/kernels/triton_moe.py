"""Mixture-of-experts MLP as two grouped GEMM launches: every expert's gate|up, then every expert's
down projection, over tokens sorted by expert (the serving path of astrai_train/model/moe.py).

Why: a Python loop over experts is E launches of tiny matmuls per projection plus a host sync
to learn the expert sizes; Qwen3-30B-A3B has 128 experts in each of 48 layers. Here a step's
MoE layer is a handful of small torch ops (routing and the sort) and two Triton launches, with
grids fixed by shapes, so a decode step can be captured in a CUDA graph.

How (the layout vLLM's fused_moe uses; the code is ours):
1. `align(ids, E, BLOCK_M)`: the N * k (token, slot) pairs, named by their flat index
   t * k + j, are sorted by expert, and each expert's run is padded to a multiple of BLOCK_M, so
   every BLOCK_M-row block of the sorted list belongs to one expert. Output: `rows` [P] (the flat
   index at each padded position, N * k for padding) and `block_expert` [P / BLOCK_M] (E for a
   block past the end). P = N*k + min(E, N*k) * (BLOCK_M - 1) rounded up to BLOCK_M is an upper
   bound of the padded length known from shapes alone; blocks past the real end exit at once.
   Torch ops only (scatter_add, cumsum, a stable argsort, searchsorted): no host read-back.
2. `_gate_up_kernel`, grid (P / BLOCK_M, cdiv(I, BLOCK_N)): a block of BLOCK_M sorted rows
   gathers its tokens' rows of x and multiplies them by its expert's gate and up rows (two
   accumulators over the same x tile), and the epilogue writes silu(gate) * up [P, I] at the
   padded positions: the activation costs no launch and gate/up never reach memory.
3. `_down_kernel`, grid (P / BLOCK_M, cdiv(D, BLOCK_N)): those rows times the expert's down
   weight; the epilogue scales each row by its routing weight (fp32) and stores it at its flat
   index in an fp32 [N * k, D] buffer, which `sum` over k folds into [N, D] (a fixed order: the
   result does not depend on scheduling, unlike atomics).
Rounding follows the eager model: gate and up are rounded to the activation dtype, silu(gate)
and its product with up each rounded once, the down product rounded before its fp32 weighting.

Contract of `moe_experts(x, gate_up, down, weights, ids)`: x [N, D] floating, gate_up [E, 2I, D]
and down [E, D, I] in x's dtype with unit stride in their last dim, weights fp32 [N, k], ids
int64 [N, k] in [0, E); returns [N, D] in x's dtype, new and contiguous. A torch custom op
(`torch.ops.astrai.moe_experts`, fake shape registered), so torch.compile keeps it as one node;
off a GPU it is moe.experts_reference unless TRITON_INTERPRET=1, where it launches the kernels
through Triton's interpreter so CPU tests check the kernel source. Inference only (no autograd).

`python -m astrai_serve.kernels.triton_moe` (TRITON_INTERPRET=1 on a CPU) checks it against the
reference. Block sizes come from `block_config` (shapes only); they are not tuned on a GPU yet.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from astrai_train.model.moe import experts_reference

try:
    import triton
    import triton.language as tl
except ImportError:            # CPU-only installs: the op still works, through the reference
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
launches = 0                   # Triton launches made here (the selfcheck proves the kernel ran)


@dataclass(frozen=True)
class MoEBlocks:
    block_m: int        # sorted rows per program (each expert's run is padded to a multiple)
    block_n: int        # output columns per program
    block_k: int        # reduction step
    num_warps: int
    num_stages: int


def block_config(n_pairs: int, n_experts: int) -> MoEBlocks:
    """Tiles from shapes only (so one CUDA graph per batch size): few rows per expert (decode)
    waste little padding with 16-row blocks; prefill fills 64-row tensor-core tiles."""
    per_expert = n_pairs / max(1, n_experts)
    if per_expert <= 16:
        return MoEBlocks(16, 64, 64, 4, 3)
    if per_expert <= 64:
        return MoEBlocks(32, 64, 64, 4, 3)
    # (gate|up keeps two accumulators: 64 x 64 each over 4 warps stays in registers)
    return MoEBlocks(64, 64, 64, 4, 3)


def check_moe_args(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> None:
    """ValueError naming the bad shape or dtype (shapes only: no device read), else None."""
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating [N, D]; got x {tuple(x.shape)} {x.dtype}")
    n, d = x.shape
    if gate_up.dim() != 3 or gate_up.shape[2] != d or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [E, 2I, D] with D={d}; got {tuple(gate_up.shape)}")
    e, i = gate_up.shape[0], gate_up.shape[1] // 2
    if tuple(down.shape) != (e, d, i):
        raise ValueError(f"down must be [E, D, I] = {(e, d, i)} to match gate_up {tuple(gate_up.shape)}; "
                         f"got {tuple(down.shape)}")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise ValueError(f"x, gate_up and down must share a dtype; got {x.dtype}, {gate_up.dtype}, {down.dtype}")
    if ids.dim() != 2 or ids.shape[0] != n or ids.dtype != torch.int64:
        raise ValueError(f"ids must be int64 [N, k] with N={n}; got {tuple(ids.shape)} {ids.dtype}")
    if tuple(weights.shape) != tuple(ids.shape) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be float32 {tuple(ids.shape)} like ids; got {tuple(weights.shape)} "
                         f"{weights.dtype}")
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("gate_up and down must have unit stride in their last dimension")


def align(ids: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows int32 [P], block_expert int32 [P / block_m]): see the module doc, step 1."""
    flat = ids.reshape(-1)
    n_pairs = flat.numel()
    padded_len = n_pairs + min(n_experts, n_pairs) * (block_m - 1)
    padded_len = -(-padded_len // block_m) * block_m
    counts = torch.zeros(n_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    rank = torch.arange(n_pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert]
    rows = torch.full((padded_len,), n_pairs, dtype=torch.int32, device=ids.device)
    rows[(ends - padded)[expert] + rank] = order.to(torch.int32)
    starts = torch.arange(0, padded_len, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)   # E past the end
    return rows, block_expert


if triton is not None:
    @triton.jit
    def _gate_up_kernel(X, W, H, ROWS, BLOCK_EXPERT, n_pairs, stride_x, stride_we, stride_wn, stride_h,
                        E: tl.constexpr, TOP_K: tl.constexpr, D: tl.constexpr, I: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr):
        """H[p, n] = silu(x[t] . W[e, n]) * (x[t] . W[e, I + n]) for the sorted rows p of one block."""
        pid_m = tl.program_id(0)
        expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
        if expert >= E:          # a block past the padded end (the grid is sized for the worst case)
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(ROWS + offs_m)
        valid = pair < n_pairs
        token = (pair // TOP_K).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        cols = tl.arange(0, BLOCK_K)
        w_gate = W + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        w_up = w_gate + I * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, D, BLOCK_K):
            k_ok = (k + cols) < D
            a = tl.load(X + token[:, None] * stride_x + (k + cols)[None, :], mask=valid[:, None] & k_ok[None, :],
                        other=0.0)
            b_mask = k_ok[:, None] & n_ok[None, :]
            b_gate = tl.load(w_gate + (k + cols)[:, None], mask=b_mask, other=0.0)
            b_up = tl.load(w_up + (k + cols)[:, None], mask=b_mask, other=0.0)
            if IEEE:             # fp32 models: no TF32 (the reference is an fp32 matmul)
                acc_gate = tl.dot(a, b_gate, acc_gate, input_precision="ieee")
                acc_up = tl.dot(a, b_up, acc_up, input_precision="ieee")
            else:
                acc_gate = tl.dot(a, b_gate, acc_gate)
                acc_up = tl.dot(a, b_up, acc_up)
        dtype = H.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)          # F.linear rounds its output, then
        up = acc_up.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)   # silu rounds, then the product
        tl.store(H + offs_m.to(tl.int64)[:, None] * stride_h + offs_n[None, :], (act * up).to(dtype),
                 mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _down_kernel(H, W, OUT, ROWS, BLOCK_EXPERT, WEIGHTS, n_pairs, stride_h, stride_we, stride_wn, stride_out,
                     E: tl.constexpr, D: tl.constexpr, I: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """OUT[pair, n] = weight[pair] * (H[p] . W[e, n]) in fp32, at each sorted row's flat index."""
        pid_m = tl.program_id(0)
        expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
        if expert >= E:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(ROWS + offs_m)
        valid = pair < n_pairs
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < D
        cols = tl.arange(0, BLOCK_K)
        w_rows = W + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        h_rows = H + offs_m.to(tl.int64)[:, None] * stride_h
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, I, BLOCK_K):
            k_ok = (k + cols) < I
            a = tl.load(h_rows + (k + cols)[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_rows + (k + cols)[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        weight = tl.load(WEIGHTS + pair, mask=valid, other=0.0)
        y = acc.to(H.dtype.element_ty).to(tl.float32) * weight[:, None]
        tl.store(OUT + pair.to(tl.int64)[:, None] * stride_out + offs_n[None, :], y,
                 mask=valid[:, None] & n_ok[None, :])


def _launch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            blocks: MoEBlocks | None = None) -> torch.Tensor:
    global launches
    n, d = x.shape
    e, i = gate_up.shape[0], gate_up.shape[1] // 2
    top_k = ids.shape[1]
    n_pairs = n * top_k
    if n_pairs == 0:
        return x.new_zeros(n, d)
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = blocks or block_config(n_pairs, e)
    rows, block_expert = align(ids, e, cfg.block_m)
    n_blocks = block_expert.numel()
    hidden = torch.empty(rows.numel(), i, dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    _gate_up_kernel[(n_blocks, triton.cdiv(i, cfg.block_n))](
        x, gate_up, hidden, rows, block_expert, n_pairs, x.stride(0), gate_up.stride(0), gate_up.stride(1),
        hidden.stride(0), E=e, TOP_K=top_k, D=d, I=i, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    out = torch.empty(n_pairs, d, dtype=torch.float32, device=x.device)
    _down_kernel[(n_blocks, triton.cdiv(d, cfg.block_n))](
        hidden, down, out, rows, block_expert, weights.contiguous(), n_pairs, hidden.stride(0), down.stride(0),
        down.stride(1), out.stride(0), E=e, D=d, I=i, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, IEEE=ieee, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    launches += 2
    return out.view(n, top_k, d).sum(dim=1).to(x.dtype)


@torch.library.custom_op("astrai::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                ids: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted sum [N, D]: two grouped-GEMM launches on CUDA (see the module doc)."""
    check_moe_args(x, gate_up, down, weights, ids)
    if triton is not None and (x.device.type == "cuda" or INTERPRET):
        return _launch(x, gate_up, down, weights, ids)
    return experts_reference(x, gate_up, down, weights, ids)


@moe_experts.register_fake
def _moe_experts_shape(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                       ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


# (N tokens, D, I, E, k, forced blocks or None): decode, dims off every block multiple, experts
# with no token, an expert over several blocks, k = E, a strided x, no tokens; block_config's
# three tile shapes (16, 32 and 64 rows) and forced ones.
CASES = [
    (1, 64, 32, 8, 2, None), (5, 48, 40, 4, 2, None), (3, 64, 96, 16, 3, None), (40, 32, 48, 4, 3, None),
    (100, 64, 48, 2, 2, None),
    (40, 32, 48, 4, 2, MoEBlocks(16, 32, 32, 4, 2)), (37, 80, 24, 6, 2, MoEBlocks(32, 16, 64, 4, 2)),
    (9, 32, 32, 3, 3, MoEBlocks(16, 16, 16, 4, 2)), (0, 32, 32, 4, 2, None),
]


def check_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Every case through `_launch` (and the op) against moe.experts_reference, one dict each."""
    from astrai_train.model.moe import route

    gen = torch.Generator().manual_seed(0)
    results = []
    for n, d, i, e, k, blocks in CASES:
        wide = torch.randn(n, d + 8, generator=gen)
        x = wide[:, 4:4 + d].to(device, dtype) if n % 2 else torch.randn(n, d, generator=gen).to(device, dtype)
        gate_up = (torch.randn(e, 2 * i, d, generator=gen) / d ** 0.5).to(device, dtype)
        down = (torch.randn(e, d, i, generator=gen) / i ** 0.5).to(device, dtype)
        logits = torch.randn(n, e, generator=gen).to(device)
        weights, ids = route(logits, k, normalize=n % 2 == 0)
        before = launches
        got = _launch(x, gate_up, down, weights, ids, blocks) if blocks else moe_experts(x, gate_up, down, weights, ids)
        launched = launches - before
        want = experts_reference(x, gate_up, down, weights, ids)
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)) if n else 0.0
        results.append({"case": (n, d, i, e, k), "dtype": str(dtype).removeprefix("torch."), "rel_err": err,
                        "launched": launched == (2 if n else 0),
                        "shape_ok": got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()})
    return results


def tolerance(dtype: str) -> float:
    return {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.5e-2}[dtype]


def selfcheck() -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRET:
        raise RuntimeError("on a CPU run this with TRITON_INTERPRET=1 (else no kernel runs)")
    # The interpreter's bf16 tl.dot is wrong (kernels/NOTES.md): fp32 and fp16 there, bf16 on a GPU.
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    results = [r for dtype in dtypes for r in check_cases(device, dtype)]
    bad = [r for r in results if not (r["launched"] and r["shape_ok"] and r["rel_err"] <= tolerance(r["dtype"]))]
    assert not bad, f"{len(bad)} of {len(results)} cases off: {bad[:5]}"
    print(f"triton_moe: kernel == reference ({len(results)} cases, worst rel err "
          f"{max(r['rel_err'] for r in results):.2e})")
    return results


if __name__ == "__main__":
    selfcheck()
    sys.exit(0)
