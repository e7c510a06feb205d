"""The `astrai` command: one module a subcommand, imported only when chosen, so `astrai --help`
is instant and the training side never imports the serving side eagerly. The training commands
live here (tokenizer.py, tasks.py, prepare.py, train.py, export.py, export_hf.py, eval.py), the
serving ones in astrai_serve/cli/. Runs in the process the user starts; only wiring: a command
parses its flags and calls the library (model/, tokenizer/, data/, objectives/), which never
imports this package.

A command module exposes `add_arguments(parser)` and `run(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order `astrai --help` shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "tokenizer": ("astrai_train.cli.tokenizer", "train a byte-level BPE tokenizer"),
    "prepare": ("astrai_train.cli.prepare", "tokenize text/JSONL into HDF5 for seq|sft|dpo|grpo"),
    "tasks": ("astrai_train.cli.tasks", "derive seq/sft/dpo/grpo task files from the Shakespeare corpus"),
    "train": ("astrai_train.cli.train", "train with a YAML recipe (SEQ, SFT, DPO, GRPO)"),
    "export": ("astrai_train.cli.export", "turn a Lightning checkpoint into a model directory"),
    "export-hf": ("astrai_train.cli.export_hf", "export a model directory as a Hugging Face Llama/Qwen2/Qwen3 directory"),
    "eval": ("astrai_train.cli.eval", "perplexity and task accuracy of a model directory"),
    "generate": ("astrai_serve.cli.generate", "generate text offline with the serving engine"),
    "serve": ("astrai_serve.cli.serve", "start the gRPC core and the OpenAI REST facade"),
    "gateway": ("astrai_serve.cli.gateway", "start only the REST facade in front of a remote gRPC core"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="astrai",
        description="astrai: train small LLMs with Lightning and serve them over gRPC and an OpenAI API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        result = module.run(args)
    except (ValueError, FileNotFoundError) as e:
        # Errors a user caused (bad config, bad value, missing file): one line, no traceback.
        print(f"astrai {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)

