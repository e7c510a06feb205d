"""SEQ: next-token prediction over packed windows (pretraining)."""
from __future__ import annotations

from typing import Any

import torch

from astrai_train.objectives.base import ObjectiveModule

class SeqModule(ObjectiveModule):
    """batch: input_ids [B, T], target_ids [B, T] (input shifted by one)."""

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Size]:
        input_ids, targets = batch["input_ids"], batch["target_ids"]
        loss = self.token_loss(input_ids, targets, None, self.recipe.seq.label_smoothing)
        return loss, {}, input_ids.shape
