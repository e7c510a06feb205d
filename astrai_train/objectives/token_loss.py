"""Next-token cross-entropy over the positions that count (pure tensor math), shared by every
objective that trains on tokens (SEQ, SFT, and the base module's fused LM-head path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id that contributes no loss (padding)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the positions that count: targets != IGNORE, and loss_mask where given.

    The logits are upcast to fp32 inside cross_entropy's log-softmax (bf16 loses ~3 digits there).
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, label_smoothing=label_smoothing)
    per_token = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE,
                                label_smoothing=label_smoothing, reduction="none")
    weights = loss_mask.reshape(-1).to(per_token.dtype) * (flat_targets != IGNORE)
    return (per_token * weights).sum() / weights.sum().clamp_min(1)
