"""GRPO: sample G completions per prompt, score them, push up the better-than-their-group ones.

`grpo.num_iterations` (mu in the GRPO paper, TRL's num_iterations) optimizer steps per rollout
batch. The first step of a cycle samples, scores and keeps the rollout; the next mu - 1 steps train
on the kept rollout again, with the "old" log-probs those of the first step, so the ratio moves off
1 and the clip bites. The data loader repeats each step's batches mu times (RepeatSampler, built
from the recipe in objectives/data.py), so a reuse step receives the very prompts of its kept
rollout (checked) and every prompt is rolled out once per epoch. With mu = 1 the old policy is the
current one detached (ratio 1 with the gradient of the log-prob: the on-policy case of the clipped
objective). Kept rollouts ride in the checkpoint, as the sampler's position does, so a run resumed
mid-cycle replays exactly what an uninterrupted one would.

batch (astrai_train.data.collate_grpo): prompts (unpadded token-id lists, the chat template up to
the assistant's turn) and answers (the strings reward functions check).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from astrai_train.objectives.base import ObjectiveModule
from astrai_train.objectives.logprobs import shifted_logprobs
from astrai_train.objectives.policy_loss import clipped_policy_loss, group_advantages
from astrai_train.objectives.reference import reference_of
from astrai_train.objectives.rewards import combined_reward
from astrai_train.objectives.rollout import RolloutSampler, rollout_seed


def pack_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt + completion per row, right-padded -> ids [N, T] and a mask [N, T] that is 1 on
    completion tokens (the ones the policy is scored on)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, len(p):len(p) + len(c)] = 1.0
    return ids.to(device), mask.to(device)


def prompt_ids(batch: dict[str, Any]) -> list[list[int]]:
    return [list(map(int, p)) for p in batch["prompts"]]


ROLLOUTS_KEY = "astrai_grpo_rollouts"


@dataclass
class Rollout:
    """One micro-batch's sampled, scored and packed completions, kept for num_iterations steps."""

    ids: torch.Tensor                  # [B*G, T] prompt + completion per row
    mask: torch.Tensor                 # [B*G, T] 1 on completion tokens
    advantages: torch.Tensor           # [B*G]
    rewards: torch.Tensor              # [B*G] (for the logs)
    ref_logprobs: torch.Tensor | None  # [B*G, T-1] from the frozen reference, computed once
    prompts: list[list[int]]           # the micro-batch's prompts (host lists), which its reuse steps receive again
    old_logprobs: torch.Tensor | None = None  # [B*G, T-1] the policy's at the cycle's first step
    uses: int = 0                      # optimizer steps trained on it so far

    def to(self, device: torch.device) -> "Rollout":
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return Rollout(**moved)


class GRPOModule(ObjectiveModule):
    def __init__(self, *args: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        g = self.recipe.grpo
        self.tokenizer = tokenizer
        self.reward_fn = combined_reward(g.rewards, g.reward_weights)
        # kl_coef 0: no reference at all (no memory, no extra forward). Under LoRA: adapters off.
        self.reference = reference_of(self.model) if g.kl_coef > 0 else None
        self.sampler = RolloutSampler(self.model, tokenizer, g.group_size, g.max_new_tokens, g.temperature,
                                      backend=g.rollout, engine_args=g.engine_args)
        self._draw = 0
        self._rollouts: dict[int, Rollout] = {}   # kept rollouts by micro-batch within the optimizer step

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._draw = batch_idx  # micro-batches of one optimizer step must draw different samples
        return super().training_step(batch, batch_idx)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sampler.weights_changed()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Size]:
        g = self.recipe.grpo
        rollout = self._rollout_for(batch)
        logprobs = shifted_logprobs(self.model(rollout.ids), rollout.ids)
        if rollout.old_logprobs is None:
            # The cycle's first step: the policy now is the "old" one (no extra forward needed).
            rollout.old_logprobs = logprobs.detach() if g.num_iterations > 1 else None
        old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs
        out = clipped_policy_loss(logprobs, old, rollout.advantages, rollout.mask[:, 1:], clip_eps=g.clip_eps,
                                  clip_eps_high=g.clip_eps_high, ref_logprobs=rollout.ref_logprobs,
                                  kl_coef=g.kl_coef, aggregation=g.aggregation)
        metrics = {
            "reward": rollout.rewards.mean(),
            "reward_std": rollout.rewards.view(-1, g.group_size).std(dim=1).mean(),
            "kl": out.kl,
            "clip_frac": out.clip_frac,
            "completion_len": rollout.mask.sum(-1).mean(),
        }
        return out.loss, metrics, rollout.ids.shape

    def _rollout_for(self, batch: dict[str, Any]) -> Rollout:
        """This micro-batch's rollout: the kept one while its num_iterations steps last (training
        only), else a new one from `batch`."""
        g = self.recipe.grpo
        key = self._draw % max(1, self.trainer.accumulate_grad_batches) if self.training else None
        kept = self._rollouts.get(key) if key is not None else None
        if kept is None or kept.uses >= g.num_iterations:
            kept = self._sample(batch)
        else:
            # The sampler repeats the step's batches, so the kept prompts are this batch's. Host
            # lists: comparing them costs no device sync.
            if prompt_ids(batch) != kept.prompts:
                raise RuntimeError(f"GRPO reuse step {kept.uses + 1}/{g.num_iterations} of micro-batch {key} got "
                                   "other prompts than its kept rollout: the data loader must repeat each step's "
                                   "batches num_iterations times (astrai_train.data.RepeatSampler)")
            if kept.ids.device != self.device:    # restored from a checkpoint onto the CPU
                kept = kept.to(self.device)
        if key is not None and g.num_iterations > 1:
            self._rollouts[key] = kept
        kept.uses += 1
        return kept

    def _sample(self, batch: dict[str, Any]) -> Rollout:
        g = self.recipe.grpo
        prompts = prompt_ids(batch)
        answers = list(batch["answers"])
        seed = rollout_seed(self.recipe.seed, self.global_step, self.global_rank, self._draw)
        completions = self.sampler.sample(prompts, seed)
        grouped_prompts = [p for p in prompts for _ in range(g.group_size)]

        prompt_texts = [self.tokenizer.decode(p) for p in prompts]
        rewards = torch.tensor([
            self.reward_fn(self.tokenizer.decode(c), answers[i // g.group_size], prompt_texts[i // g.group_size])
            for i, c in enumerate(completions)], dtype=torch.float32)
        advantages = group_advantages(rewards, g.group_size, scale=g.scale_rewards).to(self.device)
        ids, mask = pack_sequences(grouped_prompts, completions, self.tokenizer.pad_id, self.device)
        ref_logprobs = None
        if self.reference is not None:
            ref_logprobs = shifted_logprobs(self.reference.logits(ids), ids)
        return Rollout(ids, mask, advantages, rewards.to(self.device), ref_logprobs, prompts)

    # ---- exact resume mid-cycle ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.recipe.grpo.num_iterations == 1:
            return                                  # nothing outlives a step
        # plain dicts of tensors: what a weights-only checkpoint load accepts
        mine = {k: vars(r.to(torch.device("cpu"))) for k, r in self._rollouts.items()}
        every = [mine]                              # each rank keeps its own rollouts
        if dist.is_available() and dist.is_initialized():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        checkpoint[ROLLOUTS_KEY] = every

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        every = checkpoint.get(ROLLOUTS_KEY)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        # On another world size the sampler resumes at a cycle's start, where no kept rollout applies.
        if every and len(every) == world:
            # moved to the device at their next use
            self._rollouts = {k: Rollout(**fields) for k, fields in every[self.global_rank].items()}
