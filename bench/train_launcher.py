"""`bench/train.py --launcher`: data-parallel scaling of train.py itself under `lightning run model`.

Exactly what a user runs: the shipped corpus goes through `astrai tokenizer train`, `astrai tasks`
and `astrai prepare seq` (a BPE of 8,192 tokens, kept in runs/bench-launcher for the next run),
then for 1 and for N GPUs

    lightning run model --accelerator=cuda --strategy=STRATEGY --devices=D train.py
        --config configs/train/seq-qwen3-0.6b.yaml  (micro-batch 8 x 2048 per GPU, compiled, bf16-mixed)

Throughput is what train.py itself logs (perf/tokens_per_sec of the ThroughputMonitor, all ranks,
one value per 5-step window, in the run's logs/metrics.csv): the median of the windows after the
first two (compilation and warm-up). The 1-GPU run uses each strategy's own code path, so its
FSDP row is FSDP on one device. Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1).
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import common
from common import Row, log

ROOT = common.ROOT
RECIPE = ROOT / "configs" / "train" / "seq-qwen3-0.6b.yaml"
WORKDIR = ROOT / "runs" / "bench-launcher"


def astrai(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "astrai_train.cli", *args], cwd=ROOT, check=True)


def prepare(work: Path) -> tuple[Path, Path]:
    """(tokenizer dir, seq HDF5) from the shipped corpus, with the project's own commands."""
    tok, tasks, data = work / "tokenizer", work / "tasks", work / "seq_train.h5"
    if not data.exists():
        corpus = sorted(str(p) for p in (ROOT / "data" / "shakespeare").glob("*_gut.txt.gz"))
        astrai("tokenizer", "train", "--input", *corpus, "--vocab-size", "8192", "--out", str(tok))
        astrai("tasks", "--corpus", str(ROOT / "data" / "shakespeare"), "--out", str(tasks))
        astrai("prepare", "seq", "--tokenizer", str(tok), "--input", str(tasks / "seq_train.txt"), "--out", str(data))
    return tok, data


def launcher() -> list[str]:
    """`lightning run model` (make setup's shim where Lightning no longer ships that spelling)."""
    exe = shutil.which("lightning", path=str(Path(sys.executable).parent)) or shutil.which("lightning")
    if exe and "astrai lightning-run shim" in Path(exe).read_text(errors="ignore") or exe is None:
        return [sys.executable, "-m", "astrai_train.launcher_shim"]
    return [exe]


def windows(devices: int, strategy: str, steps: int, tok: Path, data: Path, work: Path) -> list[float]:
    """perf/tokens_per_sec of each 5-step window of one `lightning run model train.py` run."""
    name = f"launcher-{devices}gpu-{strategy}"
    cmd = [*launcher(), "run", "model", "--accelerator=cuda", f"--strategy={strategy}", f"--devices={devices}",
           "train.py", "--config", str(RECIPE), "--no-export", f"model.tokenizer={tok}", f"data.train_path={data}",
           "data.val_path=null", "trainer.val_check_interval=null", f"trainer.max_steps={steps}",
           "trainer.log_every_n_steps=5", f"checkpoint.every_n_steps={10 * steps}", f"out_dir={work}", f"name={name}",
           "trainer.enable_progress_bar=false"]
    log("$ " + " ".join(cmd[1:] if cmd[0] == sys.executable else cmd))
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    metrics = sorted((work / name / "logs").rglob("metrics.csv"))[-1]
    with metrics.open() as f:
        values = [float(r["perf/tokens_per_sec"]) for r in csv.DictReader(f) if r.get("perf/tokens_per_sec")]
    log(f"{devices} GPU(s): perf/tokens_per_sec windows {[round(v) for v in values]}")
    return values


def measure(devices: int, strategy: str, steps: int) -> list[Row]:
    """Rows: tokens/s on 1 and on `devices` GPUs, and the scaling efficiency."""
    import torch

    if devices < 2:
        raise ValueError(f"--launcher --ddp-devices {devices}: the data-parallel run needs at least 2 GPUs")
    if torch.cuda.device_count() < devices:
        raise ValueError(f"--launcher --ddp-devices {devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if steps < 15:
        raise ValueError(f"--launcher --steps {steps}: need at least 15 (three 5-step windows, two of them warm-up)")
    WORKDIR.mkdir(parents=True, exist_ok=True)
    tok, data = prepare(WORKDIR)
    rows, tps = [], {}
    for n in (1, devices):
        got = windows(n, strategy, steps, tok, data, WORKDIR)
        tps[n] = common.median(got[2:])
        rows.append(Row("train", f"train.py under lightning run model, {n} GPU(s) {strategy}", "tokens/s", tps[n],
                        note=f"median of {len(got) - 2} 5-step windows after 2 warm-up ones"))
    rows.append(Row("train", f"{devices} GPUs {strategy} vs 1", "scaling efficiency %",
                    100 * tps[devices] / (devices * tps[1])))
    return rows
