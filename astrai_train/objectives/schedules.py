"""Learning-rate schedules as multipliers of the peak LR, one value per optimizer step.

They are plain functions of the step so a resumed run recomputes the same LR from the step the
checkpoint restored (LambdaLR keeps only `last_epoch`), with nothing else to save.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

SCHEDULES = ("constant", "cosine", "wsd")


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) so the very first update already moves the weights.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def constant_lr(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then the peak LR for good."""
    return _warmup(step, warmup_steps)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Linear warmup to the peak, then half a cosine down to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
                        decay_fraction: float = 0.2) -> float:
    """Warmup, a long flat stretch at the peak, then a linear decay over the last `decay_fraction`
    of the run (MiniCPM's WSD): the stable phase can be extended without re-planning the run."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    decay_steps = max(1, round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - min_lr_ratio) * progress


def make_schedule(name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  decay_fraction: float = 0.2) -> Callable[[int], float]:
    """The multiplier function for LambdaLR; `name` is one of SCHEDULES."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={warmup_steps} must be >= 0")
    if total_steps <= 0:
        raise ValueError(f"the LR schedule needs a positive step count, got total_steps={total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"optim.decay_fraction={decay_fraction} must be in (0, 1]")
    if name == "constant":
        return partial(constant_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    if name == "cosine":
        return partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    return partial(warmup_stable_decay, warmup_steps=warmup_steps, total_steps=total_steps,
                   min_lr_ratio=min_lr_ratio, decay_fraction=decay_fraction)
