"""The DPO family of preference losses on sequence log-probabilities (pure tensor math).

Inputs are per-pair log-probabilities of the chosen and rejected completions under the policy and
the frozen reference. The implicit reward of a completion is beta * (policy - reference); the
logged metrics are the ones TRL reports so runs compare side by side.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class PreferenceLoss:
    loss: torch.Tensor              # scalar: mean loss over pairs
    chosen_rewards: torch.Tensor    # [B] beta * (policy - reference) log-prob of the chosen completion, detached
    rejected_rewards: torch.Tensor  # [B] the same for the rejected completion, detached

    def metrics(self) -> dict[str, torch.Tensor]:
        """TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins."""
        return {
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().mean(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).mean(),
        }


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                    beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023) with `loss_type="sigmoid"`, IPO (Azar et al. 2023) with "ipo".

    sigmoid: -log sigmoid(beta * h), optionally with conservative label smoothing eps:
             -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo:     (h - 1 / (2 beta))^2
    where h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected). IPO is meant for
    length-normalised (mean per token) log-probs; the caller decides what it passes.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(
        loss=losses.mean(),
        chosen_rewards=(beta * (policy_chosen - ref_chosen)).detach(),
        rejected_rewards=(beta * (policy_rejected - ref_rejected)).detach(),
    )
