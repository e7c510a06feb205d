"""`astrai prepare {seq,sft,dpo,grpo}`: tokenize text or JSONL into a prepared HDF5 file."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

_HELP = {
    "seq": "pretraining text: plain text files (.txt, .gz) or JSONL with a 'text' field",
    "sft": 'chat SFT: JSONL of {"messages": [...]}; loss on assistant tokens only',
    "dpo": 'preferences: JSONL of {"prompt" or "messages", "chosen", "rejected"}',
    "grpo": 'RL prompts: JSONL of {"prompt" or "messages", "answer"}',
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from astrai_train.data.h5store import COMPRESSIONS

    sub = parser.add_subparsers(dest="objective", metavar="OBJECTIVE", required=True)
    for name, help_text in _HELP.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--tokenizer", required=True, help="model directory or tokenizer directory")
        p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                       help="input files or globs (quote globs); .gz files are read compressed")
        p.add_argument("--out", required=True, help="the .h5 file to write (written atomically)")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="tokenizer processes, 0 = tokenize in this process (default: %(default)s)")
        p.add_argument("--skip-invalid", action="store_true",
                       help="skip and count malformed records instead of stopping at the first")
        p.add_argument("--compression", choices=COMPRESSIONS, default="gzip",
                       help="HDF5 compression (default: %(default)s)")
        p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def run(args: argparse.Namespace) -> int:
    from astrai_train.data.prepare import PrepareConfig, prepare

    # Ctrl-C raises KeyboardInterrupt wherever the main thread is; raised inside a __del__ or a
    # callback, Python prints and drops it, and the run would finish as if never interrupted.
    # The handler also remembers it, so a Ctrl-C is honoured however it was handled below.
    interrupted: list[int] = []

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()   # only it may set handlers
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    out, stats = Path(args.out), None
    try:
        cfg = PrepareConfig(objective=args.objective, tokenizer=args.tokenizer, inputs=tuple(args.input),
                            out=args.out, workers=args.workers, skip_invalid=args.skip_invalid,
                            compression=args.compression, progress=not args.no_progress)
        stats = prepare(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"astrai prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        # The writer removes its temporary file, but a Ctrl-C can land between the file's creation
        # and the `with` that owns it: make sure. A run that finished despite it (the exception
        # was dropped) has committed its file, which goes too: the user asked for nothing.
        out.with_name(f".{out.name}.tmp-{os.getpid()}").unlink(missing_ok=True)
        if stats is not None:
            out.unlink(missing_ok=True)
        print("astrai prepare: interrupted; nothing was written", file=sys.stderr)
        return 130
    skipped = f", skipped {stats.n_skipped:,} invalid records" if stats.n_skipped else ""
    print(f"wrote {stats.path}: {stats.n_examples:,} examples, {stats.n_tokens:,} tokens in "
          f"{stats.seconds:.1f}s ({stats.tokens_per_s:,.0f} tokens/s){skipped}")
    return 0
