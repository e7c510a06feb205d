"""Reward functions for GRPO, looked up by name from the recipe (`grpo.rewards: [exact_match]`).

A reward function takes the decoded completion, the example's reference answer and the prompt
text, and returns a float. Register your own with `@register_reward("name")` in a module you
import, or name it in the recipe as `package.module:function` and it is imported for you.
"""
from __future__ import annotations

import importlib
import re
import string
from typing import Callable, Protocol


class RewardFn(Protocol):
    def __call__(self, completion: str, answer: str, prompt: str) -> float: ...


REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available to recipes as `name`."""
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"a reward function named {name!r} is already registered ({REWARDS[name]})")
        REWARDS[name] = fn
        return fn
    return add


def get_reward(name: str) -> RewardFn:
    """A registered name, or `module:function` imported on demand."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    raise ValueError(f"unknown reward function {name!r}; registered: {', '.join(sorted(REWARDS))} "
                     "(or name one as package.module:function)")


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Case, punctuation and whitespace do not count: "Hamlet." == "hamlet"."""
    return " ".join(text.lower().translate(_PUNCT).split())


@register_reward("exact_match")
def exact_match(completion: str, answer: str, prompt: str = "") -> float:
    """1 when the completion's first line is the answer (normalised), else 0."""
    first_line = completion.strip().split("\n", 1)[0] if completion.strip() else ""
    return float(normalize_answer(first_line) == normalize_answer(answer) != "")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@register_reward("arithmetic")
def arithmetic(completion: str, answer: str, prompt: str = "") -> float:
    """1 when the first number in the completion equals the numeric answer, else 0."""
    found = _NUMBER.search(completion.replace(",", ""))
    try:
        target = float(answer.replace(",", "").strip())
    except ValueError:
        return 0.0
    return float(found is not None and abs(float(found.group()) - target) < 1e-6)


@register_reward("answer_or_number")
def answer_or_number(completion: str, answer: str, prompt: str = "") -> float:
    """arithmetic when the answer is a number, exact_match otherwise: one reward for mixed task files."""
    if _NUMBER.fullmatch(answer.replace(",", "").strip()):
        return arithmetic(completion, answer, prompt)
    return exact_match(completion, answer, prompt)


def combined_reward(names: list[str], weights: list[float] | None = None) -> Callable[[str, str, str], float]:
    """One callable summing the named rewards with their weights (resolved now, so a bad name fails early)."""
    fns = [get_reward(n) for n in names]
    ws = list(weights) if weights is not None else [1.0] * len(fns)

    def total(completion: str, answer: str, prompt: str) -> float:
        return sum(w * float(fn(completion, answer, prompt)) for fn, w in zip(fns, ws))
    return total
