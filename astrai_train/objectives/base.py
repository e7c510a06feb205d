"""What every objective shares: the model, AdamW with decay groups, the LR schedule, grad-norm
logging, and the extra state an exact resume needs (RNG of every rank, the recipe).

Subclasses implement `compute_loss(batch) -> (loss, metrics, shape)`, shape being [rows, tokens]
of what went through the model (for tokens/s and MFU); this class logs the rest.
"""
from __future__ import annotations

import random
import sys
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch import nn

from astrai_train.adapters import AdapterSpec, apply_lora
from astrai_train.model import ModelConfig, Transformer
from astrai_train.model.io import load_config
from astrai_train.objectives.config import LoRASection, ModelSection, Recipe, RecipeError
from astrai_train.objectives.schedules import make_schedule
from astrai_train.objectives.token_loss import next_token_loss

CKPT_KEY = "astrai"  # our entry in the Lightning checkpoint: recipe, model config, tokenizer dir, RNG


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              loss_mask: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    return next_token_loss(F.linear(hidden, weight), targets, loss_mask, label_smoothing)


def model_config_for(section: ModelSection, vocab_size: int | None) -> ModelConfig:
    """The ModelConfig a recipe asks for; vocab_size follows the tokenizer when one is given."""
    extra = dict(section.overrides)
    if vocab_size is not None:
        extra.setdefault("vocab_size", vocab_size)
    if section.init_from is not None:
        config = load_config(section.init_from)[0]    # astrai's own directory or an imported HF one
        if section.overrides:
            raise RecipeError(f"model.overrides={section.overrides} cannot change a pretrained model "
                              f"(model.init_from={section.init_from}); drop the overrides")
        if vocab_size is not None and vocab_size > config.vocab_size:
            raise RecipeError(f"the tokenizer has {vocab_size} tokens but the model in {section.init_from} "
                              f"only {config.vocab_size}; use the tokenizer the model was trained with")
        return config
    if section.config is not None:
        return ModelConfig.from_json(section.config).replace(**extra)
    return ModelConfig.from_preset(section.preset, **extra)


def build_model(section: ModelSection, config: ModelConfig) -> Transformer:
    if section.init_from is not None:
        return Transformer.from_pretrained(section.init_from)
    return Transformer(config)


def lora_spec(section: LoRASection) -> AdapterSpec:
    """The recipe's lora section as the adapters package spells it."""
    return AdapterSpec(section.rank, section.alpha, section.dropout, tuple(section.target_modules))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases and embeddings keep their scale (decaying an embedding
    row that a rare token rarely updates just erases it)."""
    decay, no_decay = [], []
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers: Lightning loads checkpoints with
    torch.load(weights_only=True), which refuses numpy arrays."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state = {"python": [version, torch.tensor(py_state, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ObjectiveModule(L.LightningModule):
    """Base LightningModule. `model_config` is resolved by the caller (it may depend on the tokenizer)."""

    def __init__(self, recipe: Recipe, model_config: ModelConfig, tokenizer_dir: str | None = None,
                 model: Transformer | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.model_config = model_config
        self.tokenizer_dir = tokenizer_dir
        # The whole recipe as hyperparameters: shown by TensorBoard, stored in every checkpoint.
        self.save_hyperparameters(recipe.to_dict())
        self.model = model if model is not None else build_model(recipe.model, model_config)
        if recipe.lora.rank:
            # Before activation checkpointing and compile wrap the blocks: names stay the model's.
            layers = apply_lora(self.model, lora_spec(recipe.lora))
            unmatched = sorted(set(recipe.lora.target_modules) - {n.rpartition(".")[2] for n in layers})
            if unmatched and rank_zero_only.rank == 0:   # the trainer (and so global_rank) comes later
                print(f"[astrai] lora.target_modules: {', '.join(unmatched)} match no Linear layer of this model "
                      "(left frozen; a mixture of experts keeps its experts as stacked tensors)", file=sys.stderr)
        if recipe.model.activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

            from astrai_train.model.transformer import Block

            apply_activation_checkpointing(self.model, check_fn=lambda m: isinstance(m, Block))
        # LM head + cross-entropy as one function: compiled, Inductor fuses the fp32 upcast and the
        # log-softmax reductions into the kernels that read the bf16 logits, so the fp32 copy of a
        # [tokens, vocab] tensor (10 GB at 16k tokens x 152k vocab) is never materialised.
        self.head_loss = head_loss
        if recipe.model.compile:
            # Compile block by block, in place: parameter names (and so checkpoints) stay unchanged.
            for block in self.model.layers:
                block.compile()
            self.head_loss = torch.compile(head_loss)

    # ---- the objective ---------------------------------------------------------------------
    def token_loss(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None,
                   label_smoothing: float) -> torch.Tensor:
        """Mean next-token cross-entropy of the model on input_ids (see token_loss.next_token_loss)."""
        return self.model(input_ids, head=lambda hidden, weight: self.head_loss(
            hidden, weight, targets, loss_mask, label_smoothing))

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Size]:
        """(loss, extra metrics, [rows, seq_len] of the forward pass on this rank) for one micro-batch."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, metrics, shape = self.compute_loss(batch)
        self.step_shape = tuple(shape)  # read by the throughput callback: host ints, no device sync
        self.log("train/loss", loss, prog_bar=True, sync_dist=False)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, sync_dist=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, metrics, _ = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=True)

    # ---- optimisation ----------------------------------------------------------------------
    def _fp16_scaled(self) -> bool:
        return str(self.trainer.precision).startswith("16")  # "16-mixed": a GradScaler is in play

    def configure_optimizers(self) -> Any:
        o = self.recipe.optim
        # Fused AdamW on CUDA: one kernel for the whole update instead of a few per parameter.
        # Not under fp16 loss scaling, where Lightning must unscale before clipping.
        fused = True if self.device.type == "cuda" and not self._fp16_scaled() else None
        optimizer = torch.optim.AdamW(decay_groups(self.model, o.weight_decay), lr=o.lr, betas=o.betas,
                                      eps=o.eps, fused=fused)
        total = o.total_steps or self.recipe.trainer.max_steps
        schedule = make_schedule(o.schedule, o.warmup_steps, total, o.min_lr_ratio, o.decay_fraction)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _log_step(self) -> bool:
        return self.trainer.global_step % self.trainer.log_every_n_steps == 0

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the global grad norm ourselves: Lightning refuses to clip with a fused optimizer
        (even under bf16, where nothing is scaled) and cannot clip by norm under FSDP. The norm
        the clip computes anyway is the one logged (before clipping)."""
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm") or self._fp16_scaled():
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        root = self.trainer.strategy.model
        if hasattr(root, "clip_grad_norm_"):  # FSDP: the sharded root all-reduces the shard norms
            norm = root.clip_grad_norm_(gradient_clip_val)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val, foreach=True)
        if self._log_step():
            self.log("train/grad_norm", norm)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._log_step():
            return
        self.log("train/lr", optimizer.param_groups[0]["lr"])
        if not self.trainer.gradient_clip_val:
            # No clip computes the norm for us: one extra pass over the grads on logging steps.
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    # ---- exact resume ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's RNG: the state of rank 0 alone would replay rank 0's stream on all ranks.
        states = [_rng_state()]
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, _rng_state())
        checkpoint[CKPT_KEY] = {
            "recipe": self.recipe.to_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer_dir": self.tokenizer_dir,
            "rng": states,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(CKPT_KEY, {}).get("rng")
        if states:
            rank = self.global_rank
            if rank < len(states):
                _set_rng_state(states[rank])
