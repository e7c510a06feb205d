"""GRPO: sample G completions per prompt, score them, push up the better-than-their-group ones.

One optimizer update per rollout batch, so the "old" policy is the current one detached (its
ratio is 1 with the gradient of the log-prob: the on-policy case of the clipped objective).
batch (astrai_train.data.collate_grpo): prompts (unpadded token-id lists, the chat template up to
the assistant's turn) and answers (the strings reward functions check).
"""
from __future__ import annotations

from typing import Any

import torch

from astrai_train.objectives.base import ObjectiveModule
from astrai_train.objectives.logprobs import shifted_logprobs
from astrai_train.objectives.policy_loss import clipped_policy_loss, group_advantages
from astrai_train.objectives.reference import FrozenReference
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


class GRPOModule(ObjectiveModule):
    def __init__(self, *args: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        g = self.recipe.grpo
        self.tokenizer = tokenizer
        self.reward_fn = combined_reward(g.rewards, g.reward_weights)
        # kl_coef 0: no reference at all (no memory, no extra forward).
        self.reference = FrozenReference.copy_of(self.model) if g.kl_coef > 0 else None
        self.sampler = RolloutSampler(self.model, tokenizer, g.group_size, g.max_new_tokens, g.temperature,
                                      backend=g.rollout, engine_args=g.engine_args)
        self._draw = 0

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
        prompts = [list(map(int, p)) for p in batch["prompts"]]
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
        logprobs = shifted_logprobs(self.model(ids), ids)
        ref_logprobs = None
        if self.reference is not None:
            ref_logprobs = shifted_logprobs(self.reference.logits(ids), ids)
        out = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask[:, 1:], clip_eps=g.clip_eps,
                                  clip_eps_high=g.clip_eps_high, ref_logprobs=ref_logprobs, kl_coef=g.kl_coef,
                                  aggregation=g.aggregation)
        metrics = {
            "reward": rewards.mean(),
            "reward_std": rewards.view(-1, g.group_size).std(dim=1).mean(),
            "kl": out.kl,
            "clip_frac": out.clip_frac,
            "completion_len": mask.sum(-1).mean(),
        }
        return out.loss, metrics, ids.shape
