"""GRPO's pieces as pure tensor math: group-normalised advantages, the clipped surrogate and the
k3 KL estimate, with token- or sequence-level aggregation (Shao et al. 2024; DAPO's clip-higher
and token-level mean from Yu et al. 2025)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

AGGREGATIONS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [N*G] laid out group after group -> advantages [N*G]: reward minus its group's mean,
    divided by the group's (unbiased) std when `scale` (Dr. GRPO turns scaling off)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of group_size={group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token: exp(r) - r - 1 with
    r = ref - policy; unbiased, always >= 0, low variance."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass
class PolicyLoss:
    loss: torch.Tensor        # scalar to minimise
    kl: torch.Tensor          # mean per-token k3 KL over completion tokens (0 when no reference), detached
    clip_frac: torch.Tensor   # fraction of completion tokens whose ratio was clipped, detached


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip_eps: float = 0.2, clip_eps_high: float | None = None,
                        ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                        aggregation: str = "token") -> PolicyLoss:
    """Per-token loss  -min(rho A, clip(rho, 1-eps, 1+eps_high) A) + kl_coef * k3,  rho = exp(logp - old),
    over completion tokens (mask [B, T]); advantages are per sequence [B].

    aggregation "token": sum over all tokens of the batch / number of tokens (every token weighs the
    same; long answers are not diluted). "sequence": mean over each sequence, then over sequences.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.to(logprobs.dtype).unsqueeze(-1)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None and kl_coef != 0.0:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
    if aggregation == "token":
        loss = (per_token * mask).sum() / mask.sum().clamp_min(1)
    else:
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    n_tokens = mask.sum().clamp_min(1)
    return PolicyLoss(
        loss=loss,
        kl=((kl * mask).sum() / n_tokens).detach(),
        clip_frac=(((unclipped != clipped).to(mask.dtype) * mask).sum() / n_tokens).detach(),
    )
