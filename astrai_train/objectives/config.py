"""The training recipe: one YAML file, read into frozen dataclasses, with `a.b=value` overrides.

Every section rejects keys it does not know, naming the key and the file, so a typo fails before
any model is built instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OBJECTIVES = ("seq", "sft", "dpo", "grpo")


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the offending key or value."""


@dataclass(frozen=True)
class ModelSection:
    preset: str | None = "tiny"          # configs/model/<preset>.yaml to build a fresh model from
    config: str | None = None            # a config.json (file or model directory) instead of a preset
    init_from: str | None = None         # a model directory whose weights (and config) training starts from
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields to change (e.g. dim: 64)
    tokenizer: str | None = None         # tokenizer directory; default: init_from. vocab_size follows it
    compile: bool = False                # torch.compile the model before training
    activation_checkpointing: bool = False  # recompute each block in backward to save activation memory


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4                     # peak learning rate
    weight_decay: float = 0.1            # AdamW decay on matrices (never on norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8                    # AdamW epsilon
    schedule: str = "cosine"             # constant | cosine (warmup + cosine) | wsd (warmup-stable-decay)
    warmup_steps: int = 0                # linear warmup length in optimizer steps
    min_lr_ratio: float = 0.1            # final LR as a fraction of the peak
    decay_fraction: float = 0.2          # wsd: share of the run spent decaying
    total_steps: int | None = None       # schedule length; default trainer.max_steps


@dataclass(frozen=True)
class TrainerSection:
    max_steps: int = 1000                # optimizer steps to train for
    accelerator: str = "auto"            # cpu | gpu | cuda | auto
    devices: int | str | None = None     # processes per node; None: what the launcher made, else 1
    num_nodes: int | None = None         # machines; None: what the launcher made, else 1
    strategy: str | None = None          # auto | ddp | fsdp; None: ddp when more than one process
    precision: str | None = None         # bf16-mixed | 32-true | ...; None: bf16-mixed on GPU, 32-true on CPU
    accumulate_grad_batches: int = 1     # micro-batches per optimizer step
    gradient_clip_val: float | None = 1.0  # clip the global grad norm to this (None: no clipping)
    log_every_n_steps: int = 10          # how often metrics reach the loggers (the only host syncs)
    val_check_interval: int | None = None  # validate every N training batches (None: no validation)
    limit_val_batches: int | float = 1.0  # batches (int) or fraction (float) of the validation set
    enable_progress_bar: bool = True     # tqdm progress bar on rank 0
    deterministic: bool = False          # torch deterministic algorithms (slower)


@dataclass(frozen=True)
class CheckpointSection:
    every_n_steps: int = 500             # save a checkpoint every N optimizer steps (0: only at the end)
    keep_last: int = 3                   # keep the newest k step checkpoints plus last.ckpt


@dataclass(frozen=True)
class SeqSection:
    label_smoothing: float = 0.0         # cross-entropy label smoothing


@dataclass(frozen=True)
class SFTSection:
    label_smoothing: float = 0.0         # cross-entropy label smoothing on the assistant tokens


@dataclass(frozen=True)
class DPOSection:
    beta: float = 0.1                    # strength of the implicit KL to the reference
    loss_type: str = "sigmoid"           # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0         # conservative DPO: assumed rate of flipped preference labels
    reference: str = "model"             # model: a frozen copy runs each step | precomputed: log-probs once, then freed
    reference_dir: str | None = None     # model directory of the reference; default: the starting weights


@dataclass(frozen=True)
class GRPOSection:
    group_size: int = 4                  # completions sampled per prompt (G)
    max_new_tokens: int = 32             # completion length cap
    temperature: float = 1.0             # sampling temperature of the rollouts
    clip_eps: float = 0.2                # ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
    clip_eps_high: float | None = None   # upper clip bound (DAPO clip-higher); None: clip_eps
    kl_coef: float = 0.04                # weight of the k3 KL to the reference; 0 drops the reference model
    aggregation: str = "token"           # token: mean over all tokens of the batch | sequence: per-sequence mean first
    scale_rewards: bool = True           # divide advantages by the group's std (False: Dr. GRPO)
    num_iterations: int = 1              # optimizer steps per rollout batch, whose prompts the loader repeats (GRPO's mu, TRL's num_iterations)
    rewards: list[str] = field(default_factory=lambda: ["exact_match"])  # reward functions by registry name or module:function
    reward_weights: list[float] | None = None  # one weight per reward function (default: all 1)
    rollout: str = "auto"                # engine: astrai_serve in-process | generate: the model's cached loop | auto
    engine_args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for LLM.from_model


# Linear layers of the model LoRA can adapt, by the names HF and PEFT give them (astrai_train.adapters).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "g_proj", "kv_a_proj", "kv_b_proj")


@dataclass(frozen=True)
class LoRASection:
    rank: int = 0                        # adapter rank r (PEFT's r); 0: no LoRA, every weight trains
    alpha: float = 16.0                  # PEFT's lora_alpha: the low-rank update is scaled by alpha / rank
    dropout: float = 0.0                 # dropout on the adapters' input while training (PEFT's lora_dropout)
    target_modules: list[str] = field(default_factory=lambda: [  # Linear layers that get adapters, by PEFT's names (g_proj, kv_a_proj, kv_b_proj too)
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


SECTIONS = {"seq": SeqSection, "sft": SFTSection, "dpo": DPOSection, "grpo": GRPOSection}


@dataclass(frozen=True)
class Recipe:
    objective: str = "seq"               # seq | sft | dpo | grpo
    name: str = "run"                    # run name: outputs go to <out_dir>/<name>
    out_dir: str = "runs"                # where checkpoints, logs, plots and the final model go
    seed: int = 1234                     # global seed (model init, sampling)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    data: dict[str, Any] = field(default_factory=dict)  # the data module's settings (astrai_train.data)
    seq: SeqSection = field(default_factory=SeqSection)
    sft: SFTSection = field(default_factory=SFTSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    lora: LoRASection = field(default_factory=LoRASection)  # LoRA adapters on a frozen base (off by default)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- strict construction -----------------------------------------------------------------------

def _check_value(value: Any, hint: Any, key: str, source: str) -> Any:
    """Coerce value to the field's type where YAML is loose (ints as floats, "3e-4" as a string);
    otherwise reject it naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, key, source)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if len(errors) == 1 else
                          f"{source}: {key}={value!r} has the wrong type (expected {hint})")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {key} must be a mapping, got {value!r}")
        return build(hint, value, source, prefix=f"{key}.")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            item_hints = args if origin is tuple and Ellipsis not in args else [args[0]] * len(value)
            if origin is tuple and len(item_hints) != len(value):
                raise RecipeError(f"{source}: {key} must have {len(item_hints)} items, got {value!r}")
            items = [_check_value(v, h, f"{key}[{i}]", source) for i, (v, h) in enumerate(zip(value, item_hints))]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    raise RecipeError(f"{source}: {key}={value!r} has the wrong type (expected {getattr(hint, '__name__', hint)})")


def build(cls: type, data: dict[str, Any], source: str = "recipe", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise RecipeError(f"{source}: unknown key {prefix + key!r} (known keys in "
                              f"{prefix.rstrip('.') or 'the recipe'}: {', '.join(known)})")
    return cls(**{k: _check_value(v, hints[k], f"{prefix}{k}", source) for k, v in data.items()})


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`trainer.max_steps=20 data.batch_size=4`: dotted key, YAML value, applied on the raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not of the form key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise RecipeError(f"override {item!r} has an empty key")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (None: all defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    source = "recipe"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe not found: {path}")
        source = str(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    recipe = build(Recipe, data, source)
    validate(recipe, source)
    return recipe


def validate(r: Recipe, source: str) -> None:
    """Value checks that need no files; file checks happen where the files are opened."""
    def bad(key: str, value: Any, why: str) -> RecipeError:
        return RecipeError(f"{source}: {key}={value!r}: {why}")

    if r.objective not in OBJECTIVES:
        raise bad("objective", r.objective, f"choose one of {', '.join(OBJECTIVES)}")
    m = r.model
    if sum(x is not None for x in (m.preset, m.config, m.init_from)) == 0:
        raise RecipeError(f"{source}: set one of model.preset, model.config or model.init_from")
    if r.trainer.max_steps <= 0:
        raise bad("trainer.max_steps", r.trainer.max_steps, "must be > 0")
    if r.trainer.accumulate_grad_batches <= 0:
        raise bad("trainer.accumulate_grad_batches", r.trainer.accumulate_grad_batches, "must be > 0")
    if r.optim.lr <= 0:
        raise bad("optim.lr", r.optim.lr, "must be > 0")
    if r.checkpoint.every_n_steps < 0:
        raise bad("checkpoint.every_n_steps", r.checkpoint.every_n_steps, "must be >= 0")
    if r.checkpoint.keep_last < 1:
        raise bad("checkpoint.keep_last", r.checkpoint.keep_last, "must be >= 1")
    d, g = r.dpo, r.grpo
    if d.beta <= 0:
        raise bad("dpo.beta", d.beta, "must be > 0")
    if d.loss_type not in ("sigmoid", "ipo"):
        raise bad("dpo.loss_type", d.loss_type, "choose sigmoid or ipo")
    if d.reference not in ("model", "precomputed"):
        raise bad("dpo.reference", d.reference, "choose model or precomputed")
    if g.group_size < 2:
        raise bad("grpo.group_size", g.group_size, "must be >= 2 (advantages compare completions of one prompt)")
    if not isinstance(g.num_iterations, int) or isinstance(g.num_iterations, bool) or g.num_iterations < 1:
        raise bad("grpo.num_iterations", g.num_iterations, "must be an integer >= 1")
    if g.max_new_tokens <= 0:
        raise bad("grpo.max_new_tokens", g.max_new_tokens, "must be > 0")
    if g.temperature <= 0:
        raise bad("grpo.temperature", g.temperature, "must be > 0 (GRPO needs diverse samples)")
    if not 0 < g.clip_eps < 1:
        raise bad("grpo.clip_eps", g.clip_eps, "must be in (0, 1)")
    if g.clip_eps_high is not None and g.clip_eps_high <= 0:
        raise bad("grpo.clip_eps_high", g.clip_eps_high, "must be > 0")
    if g.kl_coef < 0:
        raise bad("grpo.kl_coef", g.kl_coef, "must be >= 0")
    if g.aggregation not in ("token", "sequence"):
        raise bad("grpo.aggregation", g.aggregation, "choose token or sequence")
    if g.rollout not in ("auto", "engine", "generate"):
        raise bad("grpo.rollout", g.rollout, "choose auto, engine or generate")
    if not g.rewards:
        raise bad("grpo.rewards", g.rewards, "name at least one reward function")
    if g.reward_weights is not None and len(g.reward_weights) != len(g.rewards):
        raise bad("grpo.reward_weights", g.reward_weights, f"needs one weight per reward ({len(g.rewards)})")
    lo = r.lora
    if lo.rank < 0:
        raise bad("lora.rank", lo.rank, "must be >= 0 (0 turns LoRA off)")
    if lo.alpha <= 0:
        raise bad("lora.alpha", lo.alpha, "must be > 0")
    if not 0 <= lo.dropout < 1:
        raise bad("lora.dropout", lo.dropout, "must be in [0, 1)")
    if lo.rank and not lo.target_modules:
        raise bad("lora.target_modules", lo.target_modules, "name at least one Linear layer")
    for name in lo.target_modules:
        if name not in LORA_TARGETS:
            raise bad("lora.target_modules", name,
                      f"not a Linear layer of the model; choose from {', '.join(LORA_TARGETS)}")
