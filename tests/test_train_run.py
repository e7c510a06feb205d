"""Whole runs through the recipe runner on real prepared data: outputs, exact resume after a kill,
export, bad recipes, DPO reference modes, and SFT/GRPO on their collates."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from astrai_train.objectives import runner
from train_support import (TRAIN_PY, max_abs_diff, parse, prepare_data, python, recipe_overrides, subprocess_env,
                           weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir, corpus_dir) -> dict[str, Path]:
    return prepare_data(tokenizer_dir, corpus_dir, tmp_path_factory.mktemp("train_data"))


def run(objective, data, tokenizer_dir, out, name, steps, *extra, every=0, resume=None, batch_size=4) -> Path:
    argv = recipe_overrides(objective, data[objective], tokenizer_dir, out, name, steps, batch_size=batch_size,
                            every=every, extra=list(extra))
    if resume:
        argv = ["--resume", str(resume), *argv]
    return runner.train(parse(argv))


def logged(run_dir: Path, step: int) -> bool:
    from astrai_train.objectives.plots import read_history

    try:
        return any(s == step for s, _ in read_history(run_dir / "logs")["train/loss"])
    except (OSError, ValueError, KeyError, TypeError):  # the CSV is being rewritten
        return False


def test_resume_after_kill_is_exact(data, tokenizer_dir, tmp_path) -> None:
    straight = run("seq", data, tokenizer_dir, tmp_path, "straight", 20, every=10)
    run_dir = straight.parent
    # The outputs a run promises: model directory, checkpoints (newest k), CSV + TensorBoard logs, plot.
    assert (straight / "config.json").is_file() and (straight / "tokenizer.json").is_file()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["last.ckpt", "step-0000010.ckpt", "step-0000020.ckpt"]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # atomic writes leave no temporaries
    assert "train/loss" in (run_dir / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert list((run_dir / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # The same run in its own process, killed once the step-10 checkpoint and last.ckpt exist (the
    # resumed run must then replace that stale last.ckpt, not write last-v1.ckpt beside it).
    argv = recipe_overrides("seq", data["seq"], tokenizer_dir, tmp_path, "killed", 20, every=10)
    proc = subprocess.Popen([python(), str(TRAIN_PY), *argv], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    step10 = tmp_path / "killed" / "checkpoints" / "step-0000010.ckpt"
    deadline = time.monotonic() + 120
    # Lightning writes a step's log row after that step's on_train_batch_end checkpoint, so a
    # kill between the two loses the row; wait for it too (the resumed run starts at step 10).
    while not (step10.exists() and step10.with_name("last.ckpt").exists() and logged(tmp_path / "killed", 9)) \
            and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert step10.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "timed out"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = run("seq", data, tokenizer_dir, tmp_path, "killed", 20, every=10, resume=step10)
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0
    assert not list(step10.parent.glob("*-v1.ckpt"))
    # Both launches logged (version_0 killed, version_1 resumed); the history is stitched step by step.
    from astrai_train.objectives.plots import read_history

    steps = [s for s, _ in read_history(resumed.parent / "logs")["train/loss"]]
    assert steps == list(range(20)), steps


def test_export_command_writes_a_loadable_model_dir(data, tokenizer_dir, tmp_path) -> None:
    from astrai_train.cli import main
    from astrai_train.model import Transformer
    from astrai_train.tokenizer import Tokenizer

    model_dir = run("sft", data, tokenizer_dir, tmp_path, "sft", 3, "trainer.accumulate_grad_batches=2")
    out = tmp_path / "exported"
    assert main(["export", str(model_dir.parent / "checkpoints" / "last.ckpt"), str(out)]) == 0
    ids = torch.tensor([Tokenizer.from_pretrained(out).encode("What line follows: To be")])
    a, b = Transformer.from_pretrained(model_dir), Transformer.from_pretrained(out)
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
    assert main(["export", str(tmp_path / "missing.ckpt"), str(out)]) == 2


@pytest.mark.parametrize("case", ["unknown key", "missing data", "world mismatch", "missing tokenizer", "bad value",
                                  "bad strategy", "missing resume"])
def test_bad_recipe_fails_before_training(case, data, tokenizer_dir, tmp_path, monkeypatch, capsys) -> None:
    argv = recipe_overrides("seq", data["seq"], tokenizer_dir, tmp_path, "bad", 5)
    expected = {
        "unknown key": (["trainer.max_stepz=3"], "unknown key 'trainer.max_stepz'"),
        "missing data": ([f"data.train_path={tmp_path / 'nope.h5'}"], str(tmp_path / "nope.h5")),
        "world mismatch": (["--devices", "1"], "--devices=2"),
        "missing tokenizer": ([f"model.tokenizer={tmp_path / 'no_tok'}"], str(tmp_path / "no_tok")),
        "bad value": (["data.batch_size=0"], "batch_size"),
        "bad strategy": (["--strategy", "dpp"], "dpp"),
        "missing resume": (["--resume", "last"], "no checkpoint has been written"),
    }[case]
    if case == "world mismatch":  # what `fabric run --devices=2` exports to each process
        for k, v in {"LT_CLI_USED": "1", "LT_DEVICES": "2", "LT_NUM_NODES": "1"}.items():
            monkeypatch.setenv(k, v)
    assert runner.main([*argv, *expected[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected[1] in err[0], err
    assert not (tmp_path / "bad").exists()  # nothing was started


def test_dpo_precomputed_reference_matches_live_reference(data, tokenizer_dir, tmp_path) -> None:
    live = run("dpo", data, tokenizer_dir, tmp_path, "live", 3, "data.max_length=64")
    pre = run("dpo", data, tokenizer_dir, tmp_path, "pre", 3, "data.max_length=64", "dpo.reference=precomputed",
              f"data.val_path={data['dpo']}", "trainer.val_check_interval=2", "trainer.limit_val_batches=2")
    assert max_abs_diff(weights(live), weights(pre)) < 1e-5
    assert "val/loss" in (pre.parent / "logs" / "version_0" / "metrics.csv").read_text()  # val pairs found too
    rows = (live.parent / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    margins = [r.split(",")[header.index("train/rewards/margins")] for r in rows[1:]]
    assert float(margins[0]) == 0.0 and float(margins[-1]) != 0.0  # policy == reference at first, then moved


def test_grpo_resume_replays_the_same_rollouts(data, tokenizer_dir, tmp_path) -> None:
    grpo = ["grpo.group_size=4", "grpo.max_new_tokens=4", "grpo.rewards=[train_support:vowel_share]", "optim.lr=1e-3"]
    straight = run("grpo", data, tokenizer_dir, tmp_path, "g1", 4, *grpo, batch_size=2)
    run("grpo", data, tokenizer_dir, tmp_path, "g2", 2, *grpo, batch_size=2)
    resumed = run("grpo", data, tokenizer_dir, tmp_path, "g2", 4, *grpo, batch_size=2, resume="last")
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0
    rewards = (straight.parent / "logs" / "version_0" / "metrics.csv").read_text()
    assert "train/reward" in rewards and "train/kl" in rewards


def test_grpo_num_iterations_trains_each_rollout_several_steps(data, tokenizer_dir, tmp_path, monkeypatch) -> None:
    """grpo.num_iterations=2: a rollout is sampled every other step and trained on twice, the
    second time against the first step's log-probs (so the ratio leaves 1 and the clip can bite);
    a run resumed between the two steps of a cycle ends with the same weights as one that was not."""
    from astrai_train.objectives.rollout import RolloutSampler

    draws = []
    sample = RolloutSampler.sample
    monkeypatch.setattr(RolloutSampler, "sample", lambda self, prompts, seed: draws.append(seed) or
                        sample(self, prompts, seed))
    grpo = ["grpo.group_size=4", "grpo.max_new_tokens=4", "grpo.rewards=[train_support:vowel_share]",
            "optim.lr=1e-2", "optim.total_steps=4", "grpo.num_iterations=2", "grpo.clip_eps=0.01"]  # one LR schedule
    straight = run("grpo", data, tokenizer_dir, tmp_path, "mu1", 4, *grpo, batch_size=2)
    assert len(draws) == 2 and len(set(draws)) == 2          # steps 1 and 3 sample; 2 and 4 reuse
    rows = (straight.parent / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    clip = [float(r.split(",")[header.index("train/clip_frac")]) for r in rows[1:]
            if r.split(",")[header.index("train/clip_frac")]]
    reward = [r.split(",")[header.index("train/reward")] for r in rows[1:] if r.split(",")[header.index("train/reward")]]
    assert clip[0] == 0.0 and clip[1] > 0.0                   # the second step of a cycle is off-policy
    assert reward[0] == reward[1] and reward[2] == reward[3]  # the same rollout, trained on twice

    run("grpo", data, tokenizer_dir, tmp_path, "mu2", 3, *grpo, batch_size=2)      # stops mid-cycle
    resumed = run("grpo", data, tokenizer_dir, tmp_path, "mu2", 4, *grpo, batch_size=2, resume="last")
    assert max_abs_diff(weights(straight), weights(resumed)) == 0.0


def test_grpo_num_iterations_rolls_out_every_prompt_once_per_epoch(data, tokenizer_dir, tmp_path, monkeypatch) -> None:
    """With num_iterations=2 and 2 micro-batches per step the loader yields each step's batches twice
    in a row (as TRL's RepeatSampler does): one epoch rolls out every prompt exactly once and takes
    2 x (batches / 2) optimizer steps."""
    import lightning as L

    from astrai_train.objectives.rollout import RolloutSampler

    mu, accumulate, batch_size = 2, 2, 2
    sampled = []
    sample = RolloutSampler.sample
    monkeypatch.setattr(RolloutSampler, "sample", lambda self, prompts, seed: sampled.extend(map(tuple, prompts)) or
                        sample(self, prompts, seed))

    class Batches(L.Callback):
        def __init__(self) -> None:
            self.prompts: list[list[tuple[int, ...]]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.prompts.append([tuple(p) for p in batch["prompts"]])

    argv = recipe_overrides("grpo", data["grpo"], tokenizer_dir, tmp_path, "epoch", 100, batch_size=batch_size,
                            extra=["grpo.group_size=2", "grpo.max_new_tokens=2", "grpo.kl_coef=0",
                                   f"grpo.num_iterations={mu}", f"trainer.accumulate_grad_batches={accumulate}"])
    trainer, module, prepared = runner.setup_run(parse(argv))
    batches = Batches()
    trainer.callbacks.append(batches)
    trainer.fit_loop.max_epochs = 1
    trainer.fit(module, datamodule=prepared.datamodule)

    dataset = prepared.datamodule.train_dataset
    prompts = sorted(tuple(dataset[i]["prompt_ids"].tolist()) for i in range(len(dataset)))
    assert len(prompts) == 16 and len(set(prompts)) == 16
    assert sorted(sampled) == prompts                          # every prompt rolled out, each once
    per_epoch = len(dataset) // batch_size                     # 8 distinct batches
    assert trainer.global_step == mu * per_epoch // accumulate == 8
    # What the loader yielded: each optimizer step's micro-batches, twice in a row.
    seen = batches.prompts
    assert len(seen) == mu * per_epoch
    steps = [seen[i:i + accumulate] for i in range(0, len(seen), accumulate)]
    assert all(steps[k] == steps[k + 1] for k in range(0, len(steps), mu))
    assert all(steps[k] != steps[k + mu] for k in range(0, len(steps) - mu, mu))


def test_grpo_num_iterations_must_be_a_positive_integer(data, tokenizer_dir, tmp_path) -> None:
    from astrai_train.objectives.config import RecipeError

    with pytest.raises(RecipeError, match=r"grpo.num_iterations=0: must be an integer >= 1"):
        run("grpo", data, tokenizer_dir, tmp_path, "bad", 1, "grpo.num_iterations=0", batch_size=2)


class _Payload:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoints_load_weights_only_and_resume_falls_back_past_a_broken_last(
        data, tokenizer_dir, tmp_path, capsys) -> None:
    from astrai_train.cli import main
    from astrai_train.objectives.checkpointing import CheckpointError, resolve_resume

    model_dir = run("seq", data, tokenizer_dir, tmp_path, "ckpt", 4, every=2)
    run_dir = model_dir.parent
    folder = run_dir / "checkpoints"
    assert resolve_resume("last", run_dir) == str(folder / "last.ckpt")   # intact: taken as it is
    # A malicious pickle: refused by export and by --resume, and its command never runs.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)
    capsys.readouterr()
    assert main(["export", str(evil), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {evil} was refused" in err and "system" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError, match="was refused"):
        resolve_resume(str(evil), run_dir)
    assert not marker.exists()
    # A truncated last.ckpt: --resume last takes the newest intact step checkpoint, saying so.
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    newest = max(folder.glob("step-*.ckpt"))
    assert resolve_resume("last", run_dir) == str(newest)
    assert f"checkpoint {last} is truncated or corrupt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=f"checkpoint {last} is truncated"):
        resolve_resume(str(last), run_dir)            # a file named explicitly: no fall-back
    resumed = run("seq", data, tokenizer_dir, tmp_path, "ckpt", 4, every=2, resume="last")
    assert resumed.is_dir()
    # Nothing intact left: one error naming every file.
    for path in folder.glob("*.ckpt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        resolve_resume("last", run_dir)
    assert "is empty (0 bytes)" in str(info.value)


def test_sft_starts_from_an_imported_hugging_face_directory(data, tokenizer_dir, tmp_path) -> None:
    """model.init_from takes a transformers directory (here a Qwen2 shape: q/k/v biases), not only
    astrai's own: the run trains those weights and writes an astrai model directory."""
    transformers = pytest.importorskip("transformers")
    from astrai_train.model import Transformer
    from astrai_train.tokenizer import Tokenizer

    vocab = Tokenizer.from_pretrained(tokenizer_dir).vocab_size
    config = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf_dir = tmp_path / "qwen2"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    before = Transformer.from_pretrained(hf_dir)
    assert before.config.qkv_bias
    model_dir = run("sft", data, tokenizer_dir, tmp_path, "from-hf", 4, "model.preset=null", "model.overrides={}",
                    f"model.init_from={hf_dir}", "data.window_size=128", batch_size=8)
    after = Transformer.from_pretrained(model_dir)
    assert after.config == before.config
    moved = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert any(k.endswith("q_proj.bias") for k in moved) and any(k.endswith("down_proj.weight") for k in moved)
