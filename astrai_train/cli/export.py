"""`astrai export CKPT OUT [--merge]`: a Lightning checkpoint from `astrai train` -> a model directory
(and, for a LoRA run without --merge, the adapter in PEFT's format beside the base weights)."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a .ckpt file written by `astrai train` (e.g. runs/NAME/checkpoints/last.ckpt)")
    parser.add_argument("out", help="model directory to write (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory to copy in (default: the one the run trained with)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights before saving (default: as trained, float32)")
    parser.add_argument("--merge", action="store_true",
                        help="a LoRA run's checkpoint: write the merged weights (base + adapters) to OUT. Without it "
                             "OUT gets the base weights and OUT/adapter the adapters in PEFT's format")


def run(args: argparse.Namespace) -> int:
    from astrai_train.objectives.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, tokenizer_dir=args.tokenizer,
                            dtype=DTYPES[args.dtype] if args.dtype else None, merge=args.merge)
    adapter = out / "adapter"
    print(f"model directory written to {out}" + (f", LoRA adapter (PEFT) to {adapter}"
                                                 if not args.merge and (adapter / "adapter_config.json").is_file()
                                                 else ""))
    return 0
