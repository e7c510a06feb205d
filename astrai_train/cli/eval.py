"""`astrai eval`: perplexity and task accuracy of a model directory on held-out task data."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from astrai_train.evaluate import EvalConfig

    d = EvalConfig(model="", data="")
    parser.add_argument("--model", required=True, help="model directory (weights, config.json, tokenizer)")
    parser.add_argument("--data", required=True, help="task directory from `astrai tasks` (uses its *_eval files)")
    parser.add_argument("--limit", type=int, default=d.limit, help="examples per task metric (default: %(default)s)")
    parser.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens,
                        help="held-out tokens scored for perplexity (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                        help="generation budget of a speaker or arithmetic answer (default: %(default)s)")
    parser.add_argument("--device", default=d.device, help="torch device (default: %(default)s)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run(args: argparse.Namespace) -> int:
    from astrai_train.evaluate import EvalConfig, evaluate, format_table

    try:
        cfg = EvalConfig(model=args.model, data=args.data, limit=args.limit, ppl_tokens=args.ppl_tokens,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device,
                         progress=not args.no_progress)
        results = evaluate(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"astrai eval: error: {e}", file=sys.stderr)
        return 1
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0
