"""`astrai tokenizer ...`: train a byte-level BPE tokenizer into a model directory."""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser(
        "train",
        help="train byte-level BPE on text files (.txt or .gz)",
        description="Train a byte-level BPE tokenizer (specials: <|endoftext|> eos, <|begin_of_text|> bos, "
        "<|pad|>, <|im_start|>, <|im_end|>) and write tokenizer.json + tokenizer_config.json to --out.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="UTF-8 text files to learn merges from; gzipped files are read as-is")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="target vocabulary size including the 256 byte tokens and 5 special tokens")
    train.add_argument("--out", required=True, metavar="DIR", help="directory to write the tokenizer into")
    train.add_argument("--min-frequency", type=int, default=2, metavar="N",
                       help="a pair must occur at least N times to be merged (default: 2)")
    train.add_argument("--model-max-length", type=int, default=32768, metavar="N",
                       help="model_max_length written to tokenizer_config.json (default: 32768)")


def run(args: argparse.Namespace) -> int:
    from astrai_train.tokenizer.trainer import train_tokenizer  # heavy imports only when run

    if args.action != "train":  # argparse already restricts this; kept for direct callers
        print(f"astrai tokenizer: unknown action {args.action!r}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        tokenizer = train_tokenizer(args.input, args.vocab_size, args.out, min_frequency=args.min_frequency,
                                    model_max_length=args.model_max_length)
    except (ValueError, FileNotFoundError) as e:
        print(f"astrai tokenizer train: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    print(f"trained on {len(args.input)} file(s) in {seconds:.1f}s: vocab_size {tokenizer.vocab_size} "
          f"(asked {args.vocab_size}), eos {tokenizer.eos_id}, bos {tokenizer.bos_id}, pad {tokenizer.pad_id}, "
          f"hash {tokenizer.hash[:16]}")
    print(f"wrote {args.out}/tokenizer.json")
    print(f"wrote {args.out}/tokenizer_config.json")
    return 0
