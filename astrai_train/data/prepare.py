"""`astrai prepare`: raw text / JSONL -> a tokenized HDF5 file, streaming with bounded memory.

    reader (main process) --batches--> Pool of tokenizer workers --ordered results--> H5Writer

The reader submits at most a few batches ahead of the writer (apply_async with a bounded queue
rather than Pool.imap, whose feeder thread would read the whole input into memory), so memory
depends on the batch size and worker count, not on the input size. Results are written in input
order, so the output is deterministic whatever the number of workers.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .h5store import COMPRESSIONS, OBJECTIVE_KEYS, H5Writer
from .records import RecordError, encode_record, parse_line
from .sources import CHUNK_CHARS, Item, batches, expand_inputs, items

_TOKENIZER: Any = None  # set once per worker process by _init_worker (the Pool initializer idiom)


@dataclass(frozen=True)
class PrepareConfig:
    """One `astrai prepare` run."""

    objective: str                   # seq | sft | dpo | grpo
    tokenizer: str                   # a model directory or a tokenizer directory
    inputs: tuple[str, ...]          # files or globs; .gz accepted
    out: str                         # the .h5 file to write
    workers: int = 2                 # tokenizer processes; 0 tokenizes in this process
    skip_invalid: bool = False       # skip and count bad records instead of stopping at the first
    compression: str = "gzip"        # gzip | lzf | none
    batch_chars: int = 1 << 20       # characters of input per worker task
    chunk_chars: int = CHUNK_CHARS   # seq: characters per piece of a text file
    progress: bool = True            # show a tqdm bar with tokens/s

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVE_KEYS:
            raise ValueError(f"unknown objective {self.objective!r}; expected one of {sorted(OBJECTIVE_KEYS)}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}; expected one of {COMPRESSIONS}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class PrepareStats:
    path: Path
    n_examples: int     # segments written (documents for seq)
    n_tokens: int       # tokens written (the main token key: sequence, chosen+rejected, or prompt)
    n_skipped: int      # invalid records skipped (with skip_invalid)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)


def load_tokenizer(path: str):
    """The Tokenizer of a model or tokenizer directory."""
    from astrai_train.tokenizer import Tokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path!r} has no tokenizer.json; pass a model or tokenizer directory")
    return Tokenizer.from_pretrained(p)


def _init_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it cleans up)
    _TOKENIZER = load_tokenizer(tokenizer_dir)


def encode_batch(objective: str, batch: list[Item], tok: Any = None) -> list[tuple]:
    """Tokenize one task: ("ok", arrays, closes_segment) or ("bad", "file:line: reason") per item."""
    tok = tok if tok is not None else _TOKENIZER
    out: list[tuple] = []
    for item in batch:
        if item[0] == "text":
            _, _, text, last = item
            ids = tok.encode(text) + ([tok.eos_id] if last else [])
            out.append(("ok", {"sequence": np.asarray(ids, np.int64)}, last))
            continue
        _, path, lineno, line = item
        try:
            rec = parse_line(line)
            if objective == "seq":
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise RecordError("seq JSONL lines must be objects with a string 'text'")
                arrays = {"sequence": np.asarray(tok.encode(rec["text"]) + [tok.eos_id], np.int64)}
            else:
                arrays = encode_record(objective, rec, tok)
            out.append(("ok", arrays, True))
        except RecordError as e:
            out.append(("bad", f"{path}:{lineno}: {e}"))
    return out


def _main_tokens(objective: str, arrays: dict[str, np.ndarray]) -> int:
    keys = {"seq": ("sequence",), "sft": ("sequence",), "dpo": ("chosen", "rejected"), "grpo": ("prompt",)}[objective]
    return sum(arrays[k].size for k in keys)


def prepare(cfg: PrepareConfig) -> PrepareStats:
    """Run the pipeline; raises ValueError/FileNotFoundError with a clear message on bad input."""
    files = expand_inputs(list(cfg.inputs))
    tok = load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out)
    if out.is_dir():
        raise ValueError(f"--out {cfg.out!r} is a directory; name the .h5 file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_tokens = n_skipped = 0
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc=f"prepare {cfg.objective}", dynamic_ncols=True)
    pool = None
    attrs = {"pad_id": int(tok.pad_id), "eos_id": int(tok.eos_id),
             "sources": "\n".join(str(f) for f in files)}
    try:
        with H5Writer(out, cfg.objective, tok.vocab_size, tok.hash, attrs, cfg.compression) as writer:
            def consume(results: list[tuple]) -> None:
                nonlocal n_tokens, n_skipped
                for res in results:
                    if res[0] == "bad":
                        if not cfg.skip_invalid:
                            raise ValueError(f"{res[1]} (use --skip-invalid to skip bad records)")
                        n_skipped += 1
                        continue
                    _, arrays, close = res
                    writer.append(arrays, close=close)
                    n = _main_tokens(cfg.objective, arrays)
                    n_tokens += n
                    if bar is not None:
                        bar.update(n)
                if bar is not None:
                    bar.set_postfix(examples=writer.n_examples, skipped=n_skipped, refresh=False)

            work = batches(items(cfg.objective, files, cfg.chunk_chars), cfg.batch_chars)
            if cfg.workers == 0:
                for batch in work:
                    consume(encode_batch(cfg.objective, batch, tok))
            else:
                # spawn: workers must not inherit the parent's tokenizer threads or HDF5 handle.
                pool = mp.get_context("spawn").Pool(cfg.workers, _init_worker, (str(cfg.tokenizer),))
                pending: deque = deque()
                for batch in work:
                    pending.append(pool.apply_async(encode_batch, (cfg.objective, batch)))
                    while len(pending) > 2 * cfg.workers:
                        consume(pending.popleft().get())
                while pending:
                    consume(pending.popleft().get())
            writer.commit({"n_skipped": n_skipped})
            n_examples = writer.n_examples
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    return PrepareStats(out, n_examples, n_tokens, n_skipped, time.perf_counter() - start)
