"""One training run from a recipe: shared by `train.py` and `astrai train`.

Order matters: everything a user can get wrong (recipe keys, data files, tokenizer, the world the
launcher made) is checked before the model is built or a process group starts, so a bad recipe
costs one line of error and no wait.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from astrai_train.objectives.config import Recipe, RecipeError, load_recipe

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "train" / "seq-tiny.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None,
                        help=f"training recipe YAML (default: {DEFAULT_RECIPE.relative_to(DEFAULT_RECIPE.parents[2])})")
    parser.add_argument("--resume", default=None, metavar="PATH|last",
                        help="continue exactly from a checkpoint: a .ckpt path, or `last` for this run's newest")
    parser.add_argument("--accelerator", default=None, help="cpu | gpu | cuda | auto (sets trainer.accelerator)")
    parser.add_argument("--devices", default=None, help="processes per node (sets trainer.devices)")
    parser.add_argument("--num-nodes", "--num_nodes", dest="num_nodes", type=int, default=None,
                        help="machines (sets trainer.num_nodes); starting them is the launcher's job")
    parser.add_argument("--strategy", default=None, help="auto | ddp | fsdp (sets trainer.strategy)")
    parser.add_argument("--precision", default=None, help="bf16-mixed | 32-true | ... (sets trainer.precision)")
    parser.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None,
                        help="optimizer steps (sets trainer.max_steps)")
    parser.add_argument("--no-export", action="store_true", help="skip writing the model directory at the end")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. trainer.max_steps=20 data.batch_size=4 optim.lr=1e-3")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    overrides = list(args.overrides)
    for flag in ("accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps"):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"trainer.{flag}={value}")
    return load_recipe(args.config or DEFAULT_RECIPE, overrides)


@dataclass
class Prepared:
    """Everything checked and built before training starts."""

    recipe: Recipe
    tokenizer: Any
    tokenizer_dir: str | None
    datamodule: Any
    resume: str | None


def prepare_run(args: argparse.Namespace, env: dict[str, str] | None = None) -> Prepared:
    import torch

    from astrai_train.objectives.checkpointing import resolve_resume
    from astrai_train.objectives.data import build_datamodule
    from astrai_train.objectives.launch import resolve_world

    recipe = recipe_from_args(args)
    env = dict(os.environ if env is None else env)
    trainer = resolve_world(recipe.trainer, env, cuda_available=torch.cuda.is_available())
    recipe = replace(recipe, trainer=trainer)
    if recipe.objective == "grpo" and str(trainer.strategy).startswith("fsdp"):
        raise RecipeError("GRPO rollouts read the full weights in-process; use trainer.strategy=ddp, not fsdp")
    if recipe.lora.rank and str(trainer.strategy).startswith("fsdp"):
        raise RecipeError(f"lora.rank={recipe.lora.rank} with trainer.strategy={trainer.strategy}: LoRA layers are "
                          "not sharded yet; use trainer.strategy=ddp (adapters keep optimizer state small anyway)")
    tokenizer, tokenizer_dir = load_tokenizer(recipe)
    if recipe.objective == "grpo" and tokenizer is None:
        raise RecipeError("GRPO decodes completions to score them: set model.tokenizer (or model.init_from)")
    datamodule = build_datamodule(recipe, tokenizer)
    resume = resolve_resume(args.resume, recipe.run_dir)
    return Prepared(recipe, tokenizer, tokenizer_dir, datamodule, resume)


def load_tokenizer(recipe: Recipe) -> tuple[Any, str | None]:
    directory = recipe.model.tokenizer or recipe.model.init_from
    if directory is None:
        return None, None
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory} (model.tokenizer / model.init_from)")
    from astrai_train.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(directory), str(directory)


def build_module(recipe: Recipe, tokenizer: Any, tokenizer_dir: str | None) -> Any:
    from astrai_train.objectives import MODULES
    from astrai_train.objectives.base import model_config_for

    config = model_config_for(recipe.model, tokenizer.vocab_size if tokenizer is not None else None)
    cls = MODULES[recipe.objective]
    extra = {"tokenizer": tokenizer} if recipe.objective == "grpo" else {}
    return cls(recipe, config, tokenizer_dir=tokenizer_dir, **extra)


def build_trainer(recipe: Recipe, module: Any) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from astrai_train.objectives.checkpointing import AtomicCheckpointIO, LastCheckpoint, checkpoint_callback
    from astrai_train.objectives.throughput import ThroughputMonitor

    t = recipe.trainer
    run_dir = recipe.run_dir
    callbacks: list[Any] = [checkpoint_callback(run_dir, recipe.checkpoint),
                            LastCheckpoint(run_dir, recipe.checkpoint.every_n_steps),
                            ThroughputMonitor(module.model_config, module.model.num_parameters())]
    if t.enable_progress_bar:
        # Refreshing the bar reads the loss back from the device: once per log interval, not per step.
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every_n_steps if t.accelerator != "cpu" else 1))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy_for(recipe),
        precision=t.precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        default_root_dir=run_dir,
        callbacks=callbacks,
        # A new version directory per launch: a resumed run adds to the history instead of
        # overwriting it (the plot stitches the versions together).
        logger=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the data module's resumable sampler shards by rank itself
        num_sanity_val_steps=0,
    )


def strategy_for(recipe: Recipe) -> Any:
    """ddp without the unused-parameter scan; fsdp wrapping each decoder block."""
    name = recipe.trainer.strategy
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from astrai_train.model.transformer import Block

        return FSDPStrategy(auto_wrap_policy={Block}, state_dict_type="full",
                            activation_checkpointing_policy={Block} if recipe.model.activation_checkpointing else None)
    return name


def setup_run(args: argparse.Namespace, env: dict[str, str] | None = None) -> tuple[Any, Any, Prepared]:
    """Everything before the first step: (trainer, module, prepared). A user's mistake fails here."""
    import lightning as L

    prepared = prepare_run(args, env)
    recipe = prepared.recipe
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    module = build_module(recipe, prepared.tokenizer, prepared.tokenizer_dir)
    return build_trainer(recipe, module), module, prepared


def fit(trainer: Any, module: Any, prepared: Prepared, export: bool = True) -> Path | None:
    # weights_only: Lightning 2.6 defaults to a full unpickle; a checkpoint must not run code (checkpointing.py)
    trainer.fit(module, datamodule=prepared.datamodule, ckpt_path=prepared.resume, weights_only=True)
    return finish(trainer, prepared.recipe, export=export, resumed_from=prepared.resume)


def train(args: argparse.Namespace, env: dict[str, str] | None = None) -> Path | None:
    """Run training; returns the model directory written at the end (rank 0), else None."""
    return fit(*setup_run(args, env), export=not args.no_export)


def finish(trainer: Any, recipe: Recipe, export: bool = True, resumed_from: str | None = None) -> Path | None:
    """On rank 0: the model directory (from last.ckpt, written at the final step) and the plot.
    A run resumed past a broken last.ckpt at its final step trains no step and writes no new
    last.ckpt: its model comes from the checkpoint it resumed from."""
    last = recipe.run_dir / "checkpoints" / "last.ckpt"
    if not trainer.is_global_zero:
        return None
    if trainer.interrupted:  # Ctrl-C: Lightning stopped the loop and fit() returned
        print(f"[astrai] interrupted at step {trainer.global_step}; continue with --resume last "
              f"(the newest checkpoint is in {last.parent})", file=sys.stderr)
        return None
    from astrai_train.objectives.plots import plot_loss_curve

    png = plot_loss_curve(recipe.run_dir / "logs", recipe.run_dir / "loss.png", f"{recipe.objective} - {recipe.name}")
    out = None
    if export:
        from astrai_train.objectives.checkpointing import CheckpointError
        from astrai_train.objectives.export import export_checkpoint

        # LoRA: model/ holds the merged weights (served as is), adapter/ the adapters in PEFT's format.
        lora = {"merge": True, "adapter_dir": recipe.run_dir / "adapter"} if recipe.lora.rank else {}
        try:
            out = export_checkpoint(last, recipe.run_dir / "model", **lora)
        except CheckpointError:
            if resumed_from is None or Path(resumed_from) == last:
                raise
            out = export_checkpoint(resumed_from, recipe.run_dir / "model", **lora)
    print(f"[astrai] {recipe.objective} run finished at step {trainer.global_step}: checkpoints in "
          f"{last.parent}, logs in {recipe.run_dir / 'logs'}" + (f", loss curve {png}" if png else "")
          + (f", model directory {out}" if out else "")
          + (f", LoRA adapter {recipe.run_dir / 'adapter'}" if out and recipe.lora.rank else ""), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point with one-line errors for everything a user can get wrong."""
    parser = argparse.ArgumentParser(prog="train.py", description="train with a YAML recipe (SEQ, SFT, DPO, GRPO)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(args)


def run_cli(args: argparse.Namespace) -> int:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        setup = setup_run(args)
    except (RecipeError, FileNotFoundError, ValueError, MisconfigurationException) as e:
        # Only the setup phase turns errors into one line: an error once training runs is a
        # crash whose traceback is worth seeing.
        if os.environ.get("LOCAL_RANK", "0") == "0":  # under a launcher: one message per machine
            print(f"error: {e}", file=sys.stderr)
        return 2
    fit(*setup, export=not args.no_export)
    return 0
