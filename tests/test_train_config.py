"""Recipe loading, LR schedules, launcher-world resolution and reward functions (no training)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from astrai_train.objectives.config import RecipeError, TrainerSection, load_recipe
from astrai_train.objectives.launch import resolve_world
from astrai_train.objectives.rewards import arithmetic, combined_reward, exact_match, get_reward, register_reward
from astrai_train.objectives.schedules import make_schedule

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_overrides_and_coercion(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("objective: dpo\noptim:\n  lr: 3e-4\ntrainer:\n  max_steps: 5\n")
    r = load_recipe(path, ["trainer.max_steps=20", "dpo.beta=0.2", "optim.betas=[0.9, 0.99]"])
    assert r.objective == "dpo" and r.trainer.max_steps == 20 and r.dpo.beta == 0.2
    assert r.optim.lr == pytest.approx(3e-4) and r.optim.betas == (0.9, 0.99)


@pytest.mark.parametrize("text,overrides,message", [
    ("trainer:\n  max_stepz: 3\n", [], "unknown key 'trainer.max_stepz'"),
    ("optimizer: {}\n", [], "unknown key 'optimizer'"),
    ("", ["optim.lr=fast"], "optim.lr='fast'"),
    ("", ["objective=ppo"], "objective='ppo'"),
    ("", ["grpo.group_size=1"], "grpo.group_size=1"),
    ("", ["trainer.max_steps"], "key.path=value"),
    ("- a\n- b\n", [], "must be a mapping"),
])
def test_bad_recipes_name_the_bad_key(tmp_path, text, overrides, message) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert message in str(err.value)


def test_missing_recipe_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_schedules() -> None:
    cos = make_schedule("cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    wsd = make_schedule("wsd", warmup_steps=10, total_steps=100, min_lr_ratio=0.0, decay_fraction=0.2)
    assert wsd(50) == 1.0 and wsd(79) == 1.0
    assert wsd(90) == pytest.approx(0.5) and wsd(100) == pytest.approx(0.0)
    assert make_schedule("constant", 0, 10, 0.0)(5) == 1.0
    with pytest.raises(ValueError, match="linear"):
        make_schedule("linear", 0, 10, 0.0)


def test_world_follows_fabric_run() -> None:
    env = {"LT_CLI_USED": "1", "LT_DEVICES": "2", "LT_NUM_NODES": "1", "LT_STRATEGY": "ddp",
           "LT_ACCELERATOR": "cpu", "TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    t = resolve_world(TrainerSection(), env, cuda_available=False)
    assert (t.devices, t.num_nodes, t.strategy, t.accelerator, t.precision) == (2, 1, "ddp", "cpu", "32-true")


def test_world_follows_torchrun_and_defaults() -> None:
    t = resolve_world(TrainerSection(), {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
                      cuda_available=True)
    assert (t.devices, t.num_nodes, t.strategy, t.precision) == (2, 2, "ddp", "bf16-mixed")
    plain = resolve_world(TrainerSection(), {}, cuda_available=False)
    assert (plain.devices, plain.num_nodes, plain.strategy) == (1, 1, "auto")
    # Lightning's own subprocess launcher sets WORLD_SIZE without torchelastic: the recipe rules.
    child = resolve_world(TrainerSection(devices=2), {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, cuda_available=False)
    assert (child.devices, child.strategy) == (2, "ddp")


@pytest.mark.parametrize("trainer,env,message", [
    (TrainerSection(devices=1), {"LT_CLI_USED": "1", "LT_DEVICES": "2"}, "--devices=2"),
    (TrainerSection(devices=4), {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
     "started 2 processes per node"),
    (TrainerSection(num_nodes=2), {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"},
     "--num-nodes=1"),
    (TrainerSection(strategy="fsdp"), {"LT_CLI_USED": "1", "LT_STRATEGY": "ddp"}, "trainer.strategy='fsdp'"),
])
def test_world_mismatch_says_what_to_change(trainer, env, message) -> None:
    with pytest.raises(RecipeError) as err:
        resolve_world(trainer, env, cuda_available=False)
    assert message in str(err.value)


def test_rewards() -> None:
    assert exact_match("Hamlet.\nmore text", "hamlet") == 1.0
    assert exact_match("Horatio", "Hamlet") == 0.0
    assert exact_match("", "") == 0.0
    assert arithmetic(" 85, I think", "85") == 1.0
    assert arithmetic("it is -3", "-3") == 1.0
    assert arithmetic("84", "85") == 0.0 and arithmetic("no idea", "85") == 0.0
    both = combined_reward(["exact_match", "arithmetic"], [1.0, 0.5])
    assert both("85", "85", "What is 40 + 45?") == 1.5
    with pytest.raises(ValueError, match="nonexistent"):
        get_reward("nonexistent")
    assert get_reward("astrai_train.objectives.rewards:arithmetic") is arithmetic

    @register_reward("test_length")
    def length(completion: str, answer: str, prompt: str) -> float:
        return float(len(completion))
    assert get_reward("test_length")("abc", "", "") == 3.0


def test_shipped_recipes_load() -> None:
    recipes = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    objectives = {load_recipe(p).objective for p in recipes}
    assert objectives == {"seq", "sft", "dpo", "grpo"}
    for size in ("tiny", "125m", "qwen3-0.6b"):
        assert {p.stem.split("-", 1)[0] for p in recipes if p.stem.endswith(size)} == objectives, size
