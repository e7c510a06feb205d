"""RepeatSampler: each optimizer step's samples several times in a row (GRPO's num_iterations).

GRPO with num_iterations = mu trains on each rollout batch for mu optimizer steps. Like TRL's
RepeatSampler, the repetition is in the data: this rank's epoch order is cut into steps
(batch_size x accumulate_grad_batches samples) and each step's samples are yielded mu times
before the next step's. So the batches a reuse step receives are exactly the prompts of the
rollouts it trains on again, every prompt is rolled out once per epoch, and an epoch takes mu
times as many optimizer steps. Without it, the reuse steps would pass over their batches and an
epoch would roll out only 1/mu of the prompts.

Under DDP each rank repeats its own shard. The end of a rank's epoch that does not fill a whole
step is dropped (TRL drops an incomplete generation batch too): repeated, it would straddle an
optimizer step boundary.

Resume: the position counts samples of the repeated stream, so a checkpoint written mid-cycle
resumes mid-cycle exactly. On another world size, the run resumes at the start of the cycle
that the consumed prefix ends in (rounded down: no prompt is lost).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sampler import ResumableDistributedSampler


@dataclass(frozen=True)
class RepeatConfig:
    """How the training sampler repeats steps: not at all (times 1) but for GRPO's num_iterations > 1."""

    batches_per_step: int = 1  # batches per optimizer step and rank (trainer.accumulate_grad_batches)
    times: int = 1             # how often each step's batches come, in a row (grpo.num_iterations)

    def __post_init__(self) -> None:
        for name in ("batches_per_step", "times"):
            if getattr(self, name) < 1:
                raise ValueError(f"repeat {name} must be >= 1, got {getattr(self, name)}")


class RepeatSampler(ResumableDistributedSampler):
    def __init__(self, dataset_len: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, *, step_size: int, repeats: int) -> None:
        super().__init__(dataset_len, num_replicas, rank, shuffle, seed, drop_last)
        self.step_size = step_size
        self.repeats = repeats
        steps = self.num_samples // step_size
        if steps == 0:
            raise ValueError(f"{self.num_samples} samples per rank do not fill one optimizer step of {step_size} "
                             f"(batch_size x accumulate_grad_batches): use more data or smaller batches")
        self.num_samples = steps * step_size * repeats  # the repeated stream's length

    def rank_order(self, epoch: int) -> list[int]:
        mine = super().rank_order(epoch)
        n = self.step_size
        return [i for start in range(0, self.num_samples // self.repeats, n)
                for _ in range(self.repeats) for i in mine[start:start + n]]

    def _position_after(self, unique: int) -> int:
        """The position in the repeated stream after `unique` distinct samples of this rank,
        rounded down to the start of a cycle."""
        return min(unique // self.step_size * self.step_size * self.repeats, self.num_samples)

    def state_dict(self) -> dict[str, Any]:
        # samples_consumed (for another world size) counts distinct samples of the finished cycles.
        done = self.consumed // (self.step_size * self.repeats) * self.step_size
        return {**super().state_dict(), "samples_consumed": done * self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["num_replicas"] != self.num_replicas:
            self.consumed = self._position_after(int(state["samples_consumed"]) // self.num_replicas)
