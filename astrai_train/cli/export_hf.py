"""`astrai export-hf SRC OUT`: write a model directory as a Hugging Face Llama/Qwen2/Qwen3 directory."""
from __future__ import annotations

import argparse

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="astrai model directory (config.json + model.safetensors)")
    parser.add_argument("out", help="output directory for the transformers checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="cast weights (default: keep the stored dtype)")


def run(args: argparse.Namespace) -> int:
    from astrai_train.model.hf_export import export_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_hf(args.src, args.out, dtype=dtype)
    arch = __import__("json").loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {arch} directory to {out}")
    return 0
