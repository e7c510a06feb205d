"""`astrai tasks`: derive seq/sft/dpo/grpo task files from the Shakespeare corpus."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from astrai_train.data.tasks import EVAL_PLAYS, TaskConfig

# The corpus shipped with the project, so `astrai tasks` works from any directory of a checkout.
SHIPPED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "shakespeare"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TaskConfig()
    parser.add_argument("--corpus", type=Path, default=SHIPPED_CORPUS,
                        help="corpus directory of *.txt.gz works and metadata.txt.gz (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the task files into")
    parser.add_argument("--train-size", type=int, default=d.train_size,
                        help="examples per *_train.jsonl (default: %(default)s)")
    parser.add_argument("--eval-size", type=int, default=d.eval_size,
                        help=f"examples per *_eval.jsonl, from the held-out plays {', '.join(EVAL_PLAYS)} "
                             "(default: %(default)s)")
    parser.add_argument("--choices", type=int, default=d.choices,
                        help="speakers offered per speaker question (default: %(default)s)")
    parser.add_argument("--speaker-context", type=int, default=d.speaker_context,
                        help="speeches shown before a speaker question's line (default: %(default)s)")
    parser.add_argument("--max-line-chars", type=int, default=d.max_line_chars,
                        help="longest line used in a question or answer (default: %(default)s)")
    parser.add_argument("--max-operand", type=int, default=d.max_operand,
                        help="a sum's first number is in [0, N] (default: %(default)s)")
    parser.add_argument("--max-addend", type=int, default=d.max_addend,
                        help="a sum's second number is in [0, N] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from astrai_train.data.tasks import derive_tasks

    try:
        cfg = TaskConfig(train_size=args.train_size, eval_size=args.eval_size, choices=args.choices,
                         speaker_context=args.speaker_context, max_line_chars=args.max_line_chars,
                         max_operand=args.max_operand, max_addend=args.max_addend, seed=args.seed)
        counts = derive_tasks(args.corpus, args.out, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"astrai tasks: error: {e}", file=sys.stderr)
        return 1
    width = max(len(k) for k in counts)
    print(f"wrote {args.out}/ (held out for eval: {', '.join(EVAL_PLAYS)})")
    for name, n in counts.items():
        unit = "characters" if name.endswith(".txt") else "examples"
        print(f"  {name:<{width}}  {n:>9,} {unit}")
    return 0
