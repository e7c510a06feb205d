"""DPO (and IPO) against a frozen reference, or against reference log-probs computed once.

batch: chosen_ids / rejected_ids [B, T] (prompt + completion, right-padded), chosen_mask /
rejected_mask [B, T] = 1 on completion tokens, and `index` [B] (dataset row) when the reference
log-probs are precomputed.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from astrai_train.objectives.base import ObjectiveModule
from astrai_train.objectives.logprobs import masked_mean, masked_sum, shifted_logprobs
from astrai_train.objectives.preference_loss import preference_loss
from astrai_train.objectives.reference import FrozenReference


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def pair_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected stacked into one [2B, T] batch: one forward instead of two."""
    c, r = batch["chosen_ids"], batch["rejected_ids"]
    length = max(c.shape[1], r.shape[1])
    ids = torch.cat([_pad_to(c, length, 0), _pad_to(r, length, 0)])
    mask = torch.cat([_pad_to(batch["chosen_mask"], length, 0), _pad_to(batch["rejected_mask"], length, 0)])
    return ids, mask


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, mean: bool) -> torch.Tensor:
    """Completion log-prob per row: sum over completion tokens (DPO) or their mean (IPO)."""
    token_lp = shifted_logprobs(logits, ids)
    m = mask[:, 1:].to(token_lp.dtype)
    return masked_mean(token_lp, m) if mean else masked_sum(token_lp, m)


class DPOModule(ObjectiveModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        d = self.recipe.dpo
        self.reference = (FrozenReference.from_dir(d.reference_dir) if d.reference_dir
                          else FrozenReference.copy_of(self.model))
        self.ref_table: torch.Tensor | None = None  # [N, 2] precomputed (chosen, rejected) reference log-probs

    @property
    def _mean_logps(self) -> bool:
        return self.recipe.dpo.loss_type == "ipo"  # IPO is defined on length-normalised log-probs

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)
        if self.recipe.dpo.reference == "precomputed" and self.ref_table is None:
            self.ref_table = self._precompute(self.trainer.datamodule)
            self.reference = None  # the point of precomputing: its memory goes back now

    @torch.no_grad()
    def _precompute(self, datamodule: Any) -> torch.Tensor:
        """Reference log-probs of every training pair, each rank doing its share, summed across ranks."""
        loader = datamodule.reference_dataloader()
        rank, world = self.global_rank, self.trainer.world_size
        table = torch.zeros(len(loader.dataset), 2, device=self.device, dtype=torch.float64)
        for i, batch in enumerate(loader):
            if i % world != rank:
                continue
            batch = self.trainer.strategy.batch_to_device(batch, self.device)
            ids, mask = pair_inputs(batch)
            lp = sequence_logps(self.reference.logits(ids), ids, mask, self._mean_logps).double()
            b = batch["chosen_ids"].shape[0]
            table[batch["index"], 0] = lp[:b]
            table[batch["index"], 1] = lp[b:]
        if world > 1 and dist.is_initialized():
            dist.all_reduce(table)
        return table.float()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        ids, mask = pair_inputs(batch)
        b = batch["chosen_ids"].shape[0]
        policy = sequence_logps(self.model(ids), ids, mask, self._mean_logps)
        if self.ref_table is not None:
            ref = self.ref_table[batch["index"]]
            ref_chosen, ref_rejected = ref[:, 0], ref[:, 1]
        else:
            ref_lp = sequence_logps(self.reference.logits(ids), ids, mask, self._mean_logps)
            ref_chosen, ref_rejected = ref_lp[:b], ref_lp[b:]
        d = self.recipe.dpo
        out = preference_loss(policy[:b], policy[b:], ref_chosen, ref_rejected, beta=d.beta,
                              loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        metrics = out.metrics()
        metrics["logps/chosen"] = policy[:b].detach().mean()
        metrics["logps/rejected"] = policy[b:].detach().mean()
        return out.loss, metrics, ids.numel()
