"""The mixture-of-experts MLP: a softmax router picks each token's top-k of `n_experts` SwiGLU
experts, and the token's output is the routing-weighted sum of theirs (Qwen3-MoE, Mixtral).

Routing, as both families define it in `transformers`: probabilities = softmax over ALL experts'
logits in fp32, keep the k largest, and (`moe_norm_topk`) rescale those k to sum to 1. Mixtral
always rescales (its "softmax of the top-2 logits" is the same thing); Qwen3-MoE does when
`norm_topk_prob` is set. The weights stay fp32 and the k expert outputs are summed in fp32, then
rounded once to the activation dtype.

Parameters are stored the way transformers 5 holds them in memory, one 3-D tensor per
projection for all experts, so the names are HF's minus `model.`:
    mlp.gate.weight              [E, dim]          the router
    mlp.experts.gate_up_proj     [E, 2 * I, dim]   rows [0, I) gate, [I, 2I) up (SwiGLU's order)
    mlp.experts.down_proj        [E, dim, I]
(hf.py maps the per-expert names that `save_pretrained` writes onto these and back.) One tensor
per projection is also what a grouped GEMM wants: expert e's weight is a fixed stride away.

Compute (`experts_reference`, the training path and the CPU/oracle path of serving): the N * k
(token, slot) pairs are sorted by expert, so each expert's rows are one contiguous slice; one
matmul per expert over its slice, and the weighted rows go back to their tokens with index_add.
Expert sizes reach the host once per layer (one sync, not one per expert). A serving engine swaps
in a grouped-GEMM kernel through `InferenceOps.moe` (astrai_serve/kernels/triton_moe.py).

Not included: the router load-balancing (auxiliary) loss HF adds in training when
`output_router_logits` is set, and Mixtral's `router_jitter_noise` (hf.py refuses it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights fp32 [N, k], expert ids int64 [N, k])."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair order: the flat (token * k + slot) indices sorted by expert, stable; tokens per expert [E])."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def experts_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """sum_j weights[n, j] * SwiGLU_{ids[n, j]}(x[n]) for x [N, D], gate_up [E, 2I, D], down [E, D, I],
    weights [N, k] (fp32), ids [N, k] -> [N, D] in x's dtype. Differentiable in x, the weights and
    the expert weights (the training forward)."""
    n, k = ids.shape
    order, counts = sort_by_expert(ids, gate_up.shape[0])
    token = order // k
    rows = x[token]                                   # [N * k, D], grouped by expert
    outs = []
    for e, (chunk, size) in enumerate(zip(rows.split(counts.tolist()), counts.tolist())):
        if size:
            gate, up = F.linear(chunk, gate_up[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, down[e]))
    y = torch.cat(outs) if outs else rows.new_zeros(0, down.shape[1])
    scaled = y.float() * weights.reshape(-1)[order, None]
    out = torch.zeros(n, down.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, scaled)
    return out.to(x.dtype)


def experts_dense(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """experts_reference's result computed by EVERY expert for every token, the unrouted ones
    weighted 0: no host sync, so a CUDA graph can capture it (E / k times the work; a fallback
    for small batches where no kernel is given)."""
    n_experts = gate_up.shape[0]
    dense_w = torch.zeros(x.shape[0], n_experts, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
    gate, up = torch.einsum("nd,eid->eni", x, gate_up).chunk(2, dim=-1)
    y = torch.einsum("eni,edi->end", F.silu(gate) * up, down)
    return torch.einsum("end,ne->nd", y.float(), dense_w).to(x.dtype)


class Experts(nn.Module):
    """The stacked expert weights (no forward of its own: MoE routes)."""

    def __init__(self, n_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden))

    @torch.no_grad()
    def reset_parameters(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=out_std)   # writes into the residual stream


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; a drop-in for layers.SwiGLU in a Block."""

    def __init__(self, dim: int, hidden: int, n_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = Experts(n_experts, dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = route(F.linear(flat, self.gate.weight), self.top_k, self.normalize)
        out = experts_reference(flat, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return out.reshape(x.shape)

    def forward_flat(self, x: torch.Tensor, ops) -> torch.Tensor:
        """Inference through `ops` (inference_ops.InferenceOps.moe): the engine picks the kernel."""
        return ops.moe(x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj,
                       self.top_k, self.normalize)
