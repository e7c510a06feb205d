"""train.py under real launchers: 2-process DDP on CPU (gloo) through `fabric run` and through
`lightning run model` (astrai's shim) ends with the weights of a 1-process run over the same
global batch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from astrai_train import launcher_shim
from astrai_train.objectives import runner
from train_support import (TRAIN_PY, free_port, max_abs_diff, parse, prepare_data, recipe_overrides,
                           subprocess_env, weights)

STEPS = 3
GLOBAL_BATCH = 8
# gloo sums gradients in another order than one process does; Adam's first steps divide by
# sqrt(v) ~ |g| and so magnify that rounding for near-zero gradients. The training itself moves
# weights by ~7e-3 here, so 5e-5 still tells a different batch or a missed allreduce apart.
TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir, corpus_dir) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    data = prepare_data(tokenizer_dir, corpus_dir, root / "data")
    args = parse(recipe_overrides("seq", data["seq"], tokenizer_dir, root, "single", STEPS, batch_size=GLOBAL_BATCH))
    single = weights(runner.train(args))
    recipe = runner.recipe_from_args(args)
    L.seed_everything(recipe.seed, verbose=False)
    tok, tok_dir = runner.load_tokenizer(recipe)
    init = runner.build_module(recipe, tok, tok_dir).model.state_dict()
    assert max_abs_diff(single, init) > 100 * TOLERANCE  # the runs really train
    return {"root": root, "data": data, "tokenizer": tokenizer_dir, "single": single}


def launch(setup: dict, launcher: list[str], name: str) -> Path:
    argv = recipe_overrides("seq", setup["data"]["seq"], setup["tokenizer"], setup["root"], name, STEPS,
                            batch_size=GLOBAL_BATCH // 2)
    cmd = [*launcher, "--strategy=ddp", "--devices=2", "--accelerator=cpu", f"--main-port={free_port()}",
           str(TRAIN_PY), *argv]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return setup["root"] / name / "model"


def test_fabric_run_ddp_matches_one_process(setup) -> None:
    fabric = Path(sys.executable).parent / "fabric"
    model_dir = launch(setup, [str(fabric), "run"], "fabric")
    assert max_abs_diff(setup["single"], weights(model_dir)) < TOLERANCE


def test_lightning_run_model_shim_ddp_matches_one_process(setup, tmp_path) -> None:
    shim = launcher_shim.install(tmp_path)
    assert shim is not None and shim.name == "lightning"
    model_dir = launch(setup, [str(shim), "run", "model"], "shim")
    assert max_abs_diff(setup["single"], weights(model_dir)) < TOLERANCE


def test_shim_leaves_another_lightning_command_alone(tmp_path) -> None:
    other = tmp_path / "lightning"
    other.write_text("#!/bin/sh\necho someone else's lightning\n")
    assert launcher_shim.install(tmp_path) is None
    assert "someone else's" in other.read_text()
    other.write_text(f"#!/bin/sh\n{launcher_shim.MARKER}\n")  # our own earlier install is refreshed
    assert launcher_shim.install(tmp_path) == other and "launcher_shim" in other.read_text()


def test_grpo_num_iterations_under_ddp(setup, tmp_path) -> None:
    """GRPO with num_iterations=2 on 2 DDP ranks (`lightning run model`): each rank's loader repeats
    its own steps, so every reuse step gets its kept rollout's prompts (a mismatch raises), and
    the logged cycle shows it: the same reward twice, the clip fraction 0 on the first step."""
    shim = launcher_shim.install(tmp_path)
    argv = recipe_overrides("grpo", setup["data"]["grpo"], setup["tokenizer"], setup["root"], "grpo-ddp", 4,
                            batch_size=2, extra=["grpo.group_size=2", "grpo.max_new_tokens=4", "grpo.num_iterations=2",
                                                 "grpo.clip_eps=0.01", "optim.lr=1e-2"])
    cmd = [str(shim), "run", "model", "--strategy=ddp", "--devices=2", "--accelerator=cpu",
           f"--main-port={free_port()}", str(TRAIN_PY), *argv]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (setup["root"] / "grpo-ddp" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")

    def column(name: str) -> list[float]:
        i = header.index(name)
        return [float(r.split(",")[i]) for r in rows[1:] if r.split(",")[i]]

    reward, clip = column("train/reward"), column("train/clip_frac")
    assert len(reward) == 4 and reward[0] == reward[1] and reward[2] == reward[3]
    assert clip[0] == 0.0 and clip[2] == 0.0
