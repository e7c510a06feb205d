"""SFT: next-token cross-entropy over the assistant tokens only (loss_mask == 1)."""
from __future__ import annotations

from typing import Any

import torch

from astrai_train.objectives.base import ObjectiveModule


class SFTModule(ObjectiveModule):
    """batch: input_ids [B, T], target_ids [B, T], loss_mask [B, T] aligned with target_ids."""

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Size]:
        input_ids, targets, mask = batch["input_ids"], batch["target_ids"], batch["loss_mask"]
        loss = self.token_loss(input_ids, targets, mask, self.recipe.sft.label_smoothing)
        return loss, {"assistant_tokens": mask.sum().float()}, input_ids.shape
