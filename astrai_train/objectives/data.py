"""The recipe's `data:` section -> the data pipeline's AstraiDataModule, opened (and so checked)
before training starts: a missing file or one prepared with another tokenizer fails here."""
from __future__ import annotations

from typing import Any

from astrai_train.objectives.config import Recipe, RecipeError


def build_datamodule(recipe: Recipe, tokenizer: Any) -> Any:
    from astrai_train.data import AstraiDataModule, DataConfig, RepeatConfig

    values = dict(recipe.data)
    if not values.get("train_path"):
        raise RecipeError(f"data.train_path is not set: point it at a file from `astrai prepare {recipe.objective}`")
    objective = values.setdefault("objective", recipe.objective)
    if objective != recipe.objective:
        raise RecipeError(f"data.objective={objective!r} does not match objective={recipe.objective!r}")
    if tokenizer is not None:
        # Data tokenized by another tokenizer trains on garbage ids: refuse it up front.
        values.setdefault("tokenizer_hash", tokenizer.hash)
    try:
        config = DataConfig.from_dict(values)
    except TypeError as e:  # a wrongly typed value that the dataclass could not take
        raise RecipeError(f"data: {e}") from None
    repeat = RepeatConfig()
    if recipe.objective == "grpo":
        # Each step's prompts come num_iterations times in a row: the reuse steps of a rollout get its batch.
        repeat = RepeatConfig(recipe.trainer.accumulate_grad_batches, recipe.grpo.num_iterations)
    datamodule = AstraiDataModule(config, repeat)
    datamodule.setup("fit")  # opens the files: FileNotFoundError / ValueError naming the file
    return datamodule
