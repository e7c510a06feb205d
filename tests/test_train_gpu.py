"""Training on CUDA: bf16-mixed, MFU logging, torch.compile, GRPO through the serving engine, DPO
with precomputed reference log-probs, and DDP / FSDP across two GPUs (when there are two)."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astrai_train.objectives import runner
from train_support import TRAIN_PY, free_port, parse, prepare_data, recipe_overrides, subprocess_env, weights

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU = ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed", "trainer.log_every_n_steps=5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer_dir, corpus_dir) -> dict[str, Path]:
    return prepare_data(tokenizer_dir, corpus_dir, tmp_path_factory.mktemp("gpu_data"))


def rows(run_dir: Path) -> list[dict[str, str]]:
    path = sorted(run_dir.glob("logs/version_*/metrics.csv"))[-1]
    return list(csv.DictReader(path.open()))


def column(run_dir: Path, key: str) -> list[float]:
    return [float(r[key]) for r in rows(run_dir) if r.get(key)]


@needs_cuda
@pytest.mark.parametrize("compile_model", [False, True])
def test_seq_bf16_on_gpu_trains_and_logs_mfu(data, tokenizer_dir, tmp_path, compile_model) -> None:
    argv = recipe_overrides("seq", data["seq"], tokenizer_dir, tmp_path, "seq", 40, batch_size=16,
                            extra=[*GPU, "optim.lr=3e-3", f"model.compile={str(compile_model).lower()}"])
    model_dir = runner.train(parse(argv))
    losses = column(model_dir.parent, "train/loss")
    assert losses[-1] < losses[0] - 1.0, losses
    mfu = column(model_dir.parent, "perf/mfu")
    assert mfu and all(0 < m < 1 for m in mfu), mfu  # the device is in the peak-FLOPs table
    assert column(model_dir.parent, "perf/tokens_per_sec")
    w = weights(model_dir)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in w.values())


@needs_cuda
def test_grpo_on_gpu_uses_the_engine(data, tokenizer_dir, tmp_path) -> None:
    argv = recipe_overrides("grpo", data["grpo"], tokenizer_dir, tmp_path, "grpo", 4, batch_size=4,
                            extra=[*GPU, "trainer.log_every_n_steps=1", "grpo.group_size=4", "grpo.max_new_tokens=8",
                                   "grpo.rollout=engine",
                                   "grpo.rewards=[train_support:vowel_share]", "optim.lr=1e-3"])
    model_dir = runner.train(parse(argv))
    assert column(model_dir.parent, "train/reward")


@needs_cuda
def test_dpo_precomputed_on_gpu(data, tokenizer_dir, tmp_path) -> None:
    argv = recipe_overrides("dpo", data["dpo"], tokenizer_dir, tmp_path, "dpo", 6,
                            extra=[*GPU, "dpo.reference=precomputed", "data.max_length=64"])
    model_dir = runner.train(parse(argv))
    assert column(model_dir.parent, "train/rewards/accuracies")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus(data, tokenizer_dir, tmp_path, strategy) -> None:
    argv = recipe_overrides("seq", data["seq"], tokenizer_dir, tmp_path, strategy, 10, batch_size=8,
                            extra=["trainer.precision=bf16-mixed"])
    fabric = Path(sys.executable).parent / "fabric"
    launcher = [str(fabric), "run"] if fabric.exists() else [sys.executable, "-m", "lightning.fabric.cli"]
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run([*launcher, f"--strategy={strategy}", "--devices=2", "--accelerator=cuda",
                           f"--main-port={free_port()}", str(TRAIN_PY), *argv, "trainer.accelerator=cuda"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(tmp_path / strategy / "model")
