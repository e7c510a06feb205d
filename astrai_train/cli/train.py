"""`astrai train --config configs/train/<recipe>.yaml [KEY=VALUE ...]`: the same run as train.py."""
from __future__ import annotations

import argparse

from astrai_train.objectives import runner


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runner.add_arguments(parser)
    parser.epilog = ("Multi-process: `fabric run --strategy=ddp --devices=N train.py --config ...` "
                     "(or `lightning run model ...`, `torchrun --nproc-per-node=N train.py ...`, "
                     "or `astrai train --devices N ...` and Lightning starts the processes).")


def run(args: argparse.Namespace) -> int:
    return runner.run_cli(args)
