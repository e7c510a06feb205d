"""Data-parallel scaling through the real launcher: `lightning run model train.py` on N GPUs vs 1.

    python bench/train_launcher.py [--devices 2] [--strategy ddp] [--steps 30] [--json FILE]

Exactly what a user runs: the shipped corpus goes through `astrai tokenizer train`, `astrai tasks`
and `astrai prepare seq` (a BPE of 8,192 tokens), then for 1 and for N GPUs

    lightning run model --accelerator=cuda --strategy=STRATEGY --devices=D train.py
        --config configs/train/seq-qwen3-0.6b.yaml  (micro-batch 8 x 2048 per GPU, compiled, bf16-mixed)

Throughput is what train.py itself logs (perf/tokens_per_sec of the ThroughputMonitor, all ranks,
one value per 5-step window, in the run's logs/metrics.csv): the median of the windows after the
first two (compilation and warm-up). The 1-GPU run uses each strategy's own code path, so its
FSDP row is FSDP on one device. Scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1).
bench/train.py measures the same with Lightning's own process launcher, beside the HF peer.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Row, log  # noqa: E402

ROOT = common.ROOT
RECIPE = ROOT / "configs" / "train" / "seq-qwen3-0.6b.yaml"


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


def run(devices: int, strategy: str, steps: int, tok: Path, data: Path, work: Path) -> list[float]:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/train_launcher.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2, help="GPUs of the data-parallel run (default 2)")
    p.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp"], help="Lightning strategy (default ddp)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30: 6 windows of 5)")
    p.add_argument("--workdir", default="runs/bench-launcher", help="where data and runs go (default runs/bench-launcher)")
    p.add_argument("--json", default="", help="where to write the JSON results (default: none)")
    args = p.parse_args(argv)
    import torch

    if torch.cuda.device_count() < args.devices:
        p.error(f"--devices {args.devices}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if args.steps < 15:
        p.error(f"--steps {args.steps}: need at least 15 (three 5-step windows, two of them warm-up)")
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tok, data = prepare(work)
    rows = []
    tps = {}
    for devices in (1, args.devices):
        windows = run(devices, args.strategy, args.steps, tok, data, work)
        tps[devices] = common.median(windows[2:])
        rows.append(Row("train", f"train.py under lightning run model, {devices} GPU(s) {args.strategy}",
                        "tokens/s", tps[devices], note=f"median of {len(windows) - 2} 5-step windows after 2 warm-up ones"))
    rows.append(Row("train", f"{args.devices} GPUs {args.strategy} vs 1", "scaling efficiency %",
                    100 * tps[args.devices] / (args.devices * tps[1])))
    common.report("bench/train_launcher.py", rows, common.environment(),
                  {"devices": args.devices, "strategy": args.strategy, "steps": args.steps, "recipe": str(RECIPE)},
                  args.json or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
