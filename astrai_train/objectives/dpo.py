"""DPO (and IPO) against a frozen reference, or against reference log-probs computed once.

batch (astrai_train.data.collate_dpo): chosen_ids / rejected_ids [B, T] (prompt + completion,
right-padded), chosen_attention_mask / rejected_attention_mask (real tokens), and
chosen_loss_mask / rejected_loss_mask (completion tokens: position t counts the log-prob of
ids[:, t] given ids[:, :t]).

With `dpo.reference: precomputed` the reference runs once over the training set before the first
step and is then freed. Its log-probs are looked up per pair by a digest of the pair's token ids,
on the host before the batch is moved to the device, so the lookup costs no device sync.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from astrai_train.objectives.base import ObjectiveModule
from astrai_train.objectives.logprobs import masked_mean, masked_sum, shifted_logprobs
from astrai_train.objectives.preference_loss import preference_loss
from astrai_train.objectives.reference import AdaptersOff, FrozenReference, reference_of


# Lightning warns that a module's on_before_batch_transfer takes precedence over the data module's:
# here that is the point (the lookup belongs to the objective, not to the data).
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer`")


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=0) if x.shape[1] < length else x


def pair_inputs(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected stacked into one [2B, T] batch (one forward instead of two) and their
    completion masks."""
    c, r = batch["chosen_ids"], batch["rejected_ids"]
    length = max(c.shape[1], r.shape[1])
    ids = torch.cat([_pad_to(c, length), _pad_to(r, length)])
    mask = torch.cat([_pad_to(batch["chosen_loss_mask"], length), _pad_to(batch["rejected_loss_mask"], length)])
    return ids, mask


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, mean: bool) -> torch.Tensor:
    """Completion log-prob per row: sum over completion tokens (DPO) or their mean (IPO)."""
    token_lp = shifted_logprobs(logits, ids)
    m = mask[:, 1:].to(token_lp.dtype)
    return masked_mean(token_lp, m) if mean else masked_sum(token_lp, m)


def pair_keys(batch: dict[str, Any]) -> list[bytes]:
    """A digest per pair of its real (unpadded) chosen and rejected tokens, computed on the host."""
    keys = []
    for side_c, side_r, mc, mr in zip(batch["chosen_ids"], batch["rejected_ids"],
                                      batch["chosen_attention_mask"], batch["rejected_attention_mask"]):
        h = hashlib.blake2b(digest_size=16)
        h.update(side_c[mc.bool()].numpy().tobytes())
        h.update(b"|")
        h.update(side_r[mr.bool()].numpy().tobytes())
        keys.append(h.digest())
    return keys


class DPOModule(ObjectiveModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        d = self.recipe.dpo
        # Under LoRA the reference is the policy with its adapters off: no second copy of the weights.
        self.reference: FrozenReference | AdaptersOff | None = (
            FrozenReference.from_dir(d.reference_dir) if d.reference_dir else reference_of(self.model))
        self.ref_table: dict[bytes, tuple[float, float]] | None = None  # pair digest -> reference log-probs

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
    def _precompute(self, datamodule: Any) -> dict[bytes, tuple[float, float]]:
        """Reference log-probs of every training and validation pair: each rank a strided share,
        then shared with all ranks (whichever rank a pair lands on later, after a resume too, finds it)."""
        from torch.utils.data import ConcatDataset, DataLoader, Subset

        from astrai_train.data.datasets import collate_for

        dataset = ConcatDataset([d for d in (datamodule.train_dataset, datamodule.val_dataset) if d is not None])
        share = range(self.global_rank, len(dataset), self.trainer.world_size)
        loader = DataLoader(Subset(dataset, share), batch_size=datamodule.config.batch_size,
                            collate_fn=collate_for("dpo", datamodule.pad_id))
        table: dict[bytes, tuple[float, float]] = {}
        with self.trainer.precision_plugin.forward_context():
            for batch in loader:
                keys = pair_keys(batch)
                batch = self.trainer.strategy.batch_to_device(batch, self.device)
                ids, mask = pair_inputs(batch)
                lp = sequence_logps(self.reference.logits(ids), ids, mask, self._mean_logps).tolist()
                table.update({k: (lp[i], lp[len(keys) + i]) for i, k in enumerate(keys)})
        if dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, table)
            for part in parts:
                table.update(part)
        return table

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.ref_table is not None:
            try:
                refs = [self.ref_table[k] for k in pair_keys(batch)]
            except KeyError:
                raise RuntimeError("a DPO pair has no precomputed reference log-probs; "
                                   "was the data file changed during the run?") from None
            batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
        return batch

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Size]:
        ids, mask = pair_inputs(batch)
        b = batch["chosen_ids"].shape[0]
        policy = sequence_logps(self.model(ids), ids, mask, self._mean_logps)
        if "ref_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
        else:
            ref_lp = sequence_logps(self.reference.logits(ids), ids, mask, self._mean_logps)
            ref_chosen, ref_rejected = ref_lp[:b], ref_lp[b:]
        d = self.recipe.dpo
        out = preference_loss(policy[:b], policy[b:], ref_chosen, ref_rejected, beta=d.beta,
                              loss_type=d.loss_type, label_smoothing=d.label_smoothing)
        metrics = out.metrics()
        metrics["logps/chosen"] = policy[:b].detach().mean()
        metrics["logps/rejected"] = policy[b:].detach().mean()
        return out.loss, metrics, ids.shape
