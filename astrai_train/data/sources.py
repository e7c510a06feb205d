"""Input files for `astrai prepare`: glob expansion and streaming readers that never hold a whole
file in memory.

Work items are small tuples so they pickle cheaply to worker processes:
    ("text", path, chunk, ends_document)   seq: a piece of a text file
    ("line", path, lineno, line)           a JSONL line (seq {"text"}, sft, dpo, grpo)
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from pathlib import Path
from typing import IO, Iterator

Item = tuple

# seq text is cut where a BPE pre-tokenizer cuts anyway (after a newline that ends a non-blank
# line and before a word character), so chunked tokenization equals whole-file tokenization.
CHUNK_CHARS = 1 << 18


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs, in the order given (each glob sorted), without duplicates."""
    if not patterns:
        raise ValueError("no --input given")
    files: list[Path] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            raise ValueError(f"input {pattern!r} is a directory; pass files or a glob such as '{pattern}/*.txt.gz'")
        matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern, recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if p not in files:
                files.append(p)
    return files


def open_text(path: Path) -> IO[str]:
    """A text stream over a plain or gzipped file; bytes that are not UTF-8 raise an error naming the file."""
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict")  # universal newlines: \r\n -> \n


def is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith((".jsonl", ".json"))


def _safe_cut(buf: str) -> int:
    """Largest i < len(buf) with buf[i-1] == '\\n', buf[i-2] not space and buf[i] a word character; 0 if none."""
    pos = len(buf) - 1
    while True:
        nl = buf.rfind("\n", 1, pos)
        if nl < 1:
            return 0
        if not buf[nl - 1].isspace() and nl + 1 < len(buf) and (buf[nl + 1].isalnum() or buf[nl + 1] == "_"):
            return nl + 1
        pos = nl


def text_chunks(path: Path, chunk_chars: int = CHUNK_CHARS) -> Iterator[Item]:
    """A text file as ("text", path, piece, is_last) items of about chunk_chars characters."""
    name = str(path)
    with open_text(path) as f:
        buf = ""
        try:
            while True:
                block = f.read(chunk_chars)
                if not block:
                    break
                buf += block
                while len(buf) >= 2 * chunk_chars:
                    cut = _safe_cut(buf[: 2 * chunk_chars]) or 2 * chunk_chars  # no safe cut in a huge line: cut anyway
                    yield ("text", name, buf[:cut], False)
                    buf = buf[cut:]
                if len(buf) >= chunk_chars:
                    cut = _safe_cut(buf)
                    if cut:
                        yield ("text", name, buf[:cut], False)
                        buf = buf[cut:]
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
        yield ("text", name, buf, True)


def jsonl_lines(path: Path) -> Iterator[Item]:
    """Non-blank lines of a JSONL file as ("line", path, lineno, text) items (lineno from 1)."""
    name = str(path)
    with open_text(path) as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield ("line", name, lineno, line)
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{lineno + 1}: not UTF-8 text ({e.reason})") from None


def items(objective: str, files: list[Path], chunk_chars: int = CHUNK_CHARS) -> Iterator[Item]:
    for path in files:
        if objective == "seq" and not is_jsonl(path):
            yield from text_chunks(path, chunk_chars)
        else:
            yield from jsonl_lines(path)


def batches(stream: Iterator[Item], max_chars: int, max_items: int = 4096) -> Iterator[list[Item]]:
    """Group items into worker tasks of about max_chars characters."""
    batch: list[Item] = []
    size = 0
    for item in stream:
        batch.append(item)
        size += len(item[2]) if item[0] == "text" else len(item[3])
        if size >= max_chars or len(batch) >= max_items:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
