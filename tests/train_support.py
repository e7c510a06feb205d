"""Helpers for the training tests: small prepared data files, recipes and runs."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"

TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "dim_ffn": 128,
              "max_len": 256}


def prepare_data(tokenizer_dir: Path, corpus_dir: Path, out: Path) -> dict[str, Path]:
    """seq/sft/dpo/grpo HDF5 files, a few dozen examples each, from real Shakespeare text."""
    from astrai_train.data.prepare import PrepareConfig, prepare

    out.mkdir(parents=True, exist_ok=True)
    text = gzip.open(corpus_dir / "hamlet_gut.txt.gz", "rt").read()[20000:60000]
    lines = [ln.strip() for ln in text.splitlines() if 12 <= len(ln.strip()) <= 60][:80]
    (out / "seq.txt").write_text(text)
    user = lambda s: [{"role": "user", "content": s}]  # noqa: E731
    assistant = lambda s: [{"role": "assistant", "content": s}]  # noqa: E731
    records = {
        "sft": [{"messages": user(f"What line follows: {a}") + assistant(b)} for a, b in zip(lines, lines[1:])],
        "dpo": [{"prompt": user(f"What line follows: {a}"), "chosen": assistant(b), "rejected": assistant(c)}
                for a, b, c in zip(lines, lines[1:], reversed(lines))][:48],
        "grpo": [{"prompt": user(f"What is {i} + {2 * i}?"), "answer": str(3 * i)} for i in range(16)],
    }
    for name, rows in records.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {}
    for objective in ("seq", "sft", "dpo", "grpo"):
        src = out / (f"{objective}.txt" if objective == "seq" else f"{objective}.jsonl")
        files[objective] = out / f"{objective}.h5"
        prepare(PrepareConfig(objective=objective, tokenizer=str(tokenizer_dir), inputs=(str(src),),
                              out=str(files[objective]), workers=0, progress=False))
    return files


def recipe_overrides(objective: str, data: Path, tokenizer_dir: Path, out_dir: Path, name: str,
                     steps: int, batch_size: int = 4, every: int = 0, extra: list[str] | None = None) -> list[str]:
    model = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_MODEL.items()) + "}"
    return [f"objective={objective}", f"name={name}", f"out_dir={out_dir}", "model.preset=tiny",
            f"model.overrides={model}", f"model.tokenizer={tokenizer_dir}", f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
            f"checkpoint.every_n_steps={every}", "checkpoint.keep_last=2", f"data.train_path={data}",
            f"data.batch_size={batch_size}", "data.window_size=32", "optim.lr=3e-3", "optim.warmup_steps=2",
            *(extra or [])]


def parse(argv: list[str]) -> argparse.Namespace:
    from astrai_train.objectives import runner

    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return parser.parse_args(argv)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def subprocess_env() -> dict[str, str]:
    """A child environment without launcher variables leaking in from whatever started pytest."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LT_", "TORCHELASTIC", "PL_")) and k not in
           ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR",
            "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    return env


def python() -> str:
    return sys.executable


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vowel_share(completion: str, answer: str, prompt: str) -> float:
    """A dense test reward (named in recipes as train_support:vowel_share): share of vowels in the text."""
    return sum(ch in "aeiouAEIOU" for ch in completion) / max(1, len(completion))
