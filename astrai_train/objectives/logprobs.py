"""Per-token log-probabilities of given tokens, the quantity DPO and GRPO are built from."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | prefix) for logits [B, T, V] and targets [B, T] -> [B, T] (float32).

    Computed as a negated cross-entropy so the [B, T, V] log-softmax is never materialised twice;
    float32 because bf16 log-probs lose the small differences DPO/GRPO ratios are made of.
    Targets outside the vocabulary (e.g. -100 padding) give 0 and must be masked by the caller.
    """
    flat_targets = targets.reshape(-1)
    valid = flat_targets >= 0
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat_targets.clamp_min(0), reduction="none")
    return (-nll * valid).view(targets.shape)


def shifted_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probs of input_ids[:, 1:] given logits[:, :-1] -> [B, T-1]: position t scores token t+1."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:])


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of values where mask is set -> [B]."""
    return (values * mask).sum(-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of values where mask is set -> [B]; an empty mask gives 0, not NaN."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)
