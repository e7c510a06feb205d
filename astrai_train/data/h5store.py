"""The prepared-data file: HDF5 with one flat dataset per key plus its segment offsets.

Layout (format version 1):

    /<key>            1-D, every segment of that key concatenated (chunked, compressed)
    /<key>_offsets    1-D int64, n_segments + 1 entries; segment i is <key>[off[i]:off[i+1]]
    attrs             format_version, objective, tokenizer_hash, vocab_size, pad_id, eos_id,
                      token_dtype, n_examples, n_skipped, n_tokens_<key>, sources (JSON)

Token keys use the smallest unsigned dtype the vocabulary fits in; masks are uint8; `answer`
(GRPO) holds UTF-8 bytes. Concatenation + offsets keeps the file append-only while writing
(resizable datasets, bounded memory) and lets datasets cut windows across segment boundaries.

The writer works on a temporary file next to the target and renames it only on success, so an
error or Ctrl-C never leaves a half-written file under the target's name.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FORMAT_VERSION = 1

# objective -> key -> kind ("token", "mask" or "bytes")
OBJECTIVE_KEYS: dict[str, dict[str, str]] = {
    "seq": {"sequence": "token"},
    "sft": {"sequence": "token", "loss_mask": "mask"},
    "dpo": {"prompt": "token", "chosen": "token", "chosen_mask": "mask",
            "rejected": "token", "rejected_mask": "mask"},
    "grpo": {"prompt": "token", "answer": "bytes"},
}
COMPRESSIONS = ("gzip", "lzf", "none")
_CHUNK = 1 << 15  # elements per HDF5 chunk: large enough to compress well, small enough to read a window cheaply


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _dtype(kind: str, vocab_size: int) -> np.dtype:
    return token_dtype(vocab_size) if kind == "token" else np.dtype(np.uint8)


class H5Writer:
    """Append segments to a new prepared-data file; `commit()` publishes it atomically."""

    def __init__(self, path: str | Path, objective: str, vocab_size: int, tokenizer_hash: str,
                 attrs: dict[str, Any] | None = None, compression: str = "gzip",
                 flush_elements: int = 1 << 20) -> None:
        if objective not in OBJECTIVE_KEYS:
            raise ValueError(f"unknown objective {objective!r}; expected one of {sorted(OBJECTIVE_KEYS)}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(self.path.parent)!r} does not exist")
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.keys = OBJECTIVE_KEYS[objective]
        self.flush_elements = flush_elements
        comp = None if compression == "none" else compression
        opts = {"gzip": 4} if comp == "gzip" else {}
        self._file = h5py.File(self.tmp_path, "w")
        try:
            self._file.attrs.update({"format_version": FORMAT_VERSION, "objective": objective,
                                     "tokenizer_hash": tokenizer_hash, "vocab_size": vocab_size,
                                     "token_dtype": token_dtype(vocab_size).name, **(attrs or {})})
            for key, kind in self.keys.items():
                self._file.create_dataset(key, shape=(0,), maxshape=(None,), dtype=_dtype(kind, vocab_size),
                                          chunks=(_CHUNK,), compression=comp, compression_opts=opts.get(comp))
                self._file.create_dataset(f"{key}_offsets", data=np.zeros(1, np.int64), maxshape=(None,),
                                          chunks=(_CHUNK,), compression=comp, compression_opts=opts.get(comp))
            self._dtypes = {k: _dtype(kind, vocab_size) for k, kind in self.keys.items()}
            self._buf: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
            self._ends: dict[str, list[int]] = {k: [] for k in self.keys}
            self._open_len = {k: 0 for k in self.keys}  # length of the segment being appended to
            self._written = {k: 0 for k in self.keys}   # elements already in the file
            self._buffered = 0
            self.n_examples = 0
            self.n_tokens = {k: 0 for k in self.keys}
            self._done = False
        except BaseException:
            # Interrupted (Ctrl-C included) before a `with` block could own the file: clean up here.
            self._file.close()
            self.tmp_path.unlink(missing_ok=True)
            raise

    def append(self, parts: dict[str, np.ndarray], close: bool = True) -> None:
        """Add to the open segment of every key; `close` ends it (one example, or one document)."""
        if set(parts) != set(self.keys):
            raise ValueError(f"expected keys {sorted(self.keys)}, got {sorted(parts)}")
        for key, arr in parts.items():
            arr = np.asarray(arr)
            if arr.size and self.keys[key] == "token" and int(arr.max()) > np.iinfo(self._dtypes[key]).max:
                raise ValueError(f"token id {int(arr.max())} does not fit {self._dtypes[key].name}")
            self._buf[key].append(arr.astype(self._dtypes[key], copy=False))
            self._open_len[key] += arr.size
            self.n_tokens[key] += arr.size
            self._buffered += arr.size
            if close:
                self._ends[key].append(self.n_tokens[key])
                self._open_len[key] = 0
        if close:
            self.n_examples += 1
        if self._buffered >= self.flush_elements:
            self._flush()

    def _flush(self) -> None:
        for key in self.keys:
            if self._buf[key]:
                data = np.concatenate(self._buf[key])
                ds = self._file[key]
                ds.resize((self._written[key] + data.size,))
                ds[self._written[key]:] = data
                self._written[key] += data.size
                self._buf[key] = []
            if self._ends[key]:
                off = self._file[f"{key}_offsets"]
                n = off.shape[0]
                off.resize((n + len(self._ends[key]),))
                off[n:] = np.asarray(self._ends[key], np.int64)
                self._ends[key] = []
        self._buffered = 0

    def commit(self, attrs: dict[str, Any] | None = None) -> Path:
        """Close any open segment, write the counts, and rename the file into place."""
        if any(self._open_len.values()):
            self.append({k: np.zeros(0, self._dtypes[k]) for k in self.keys}, close=True)
        self._flush()
        self._file.attrs.update({"n_examples": self.n_examples,
                                 **{f"n_tokens_{k}": v for k, v in self.n_tokens.items()}, **(attrs or {})})
        self._file.close()
        os.replace(self.tmp_path, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (idempotent)."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "H5Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Any exit without commit(), KeyboardInterrupt included, discards the partial file.
        self.abort()


class TokenStore:
    """Read side of a prepared file. Safe to pickle into DataLoader workers: the HDF5 handle is
    opened lazily in whichever process first reads (h5py handles must not cross a fork)."""

    def __init__(self, path: str | Path, objective: str | None = None, tokenizer_hash: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"prepared data file {str(self.path)!r} does not exist "
                                    "(create it with `astrai prepare`)")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
                version = self.attrs.get("format_version")
                if version != FORMAT_VERSION:
                    raise ValueError(f"{self.path}: format version {version!r}, this astrai reads version "
                                     f"{FORMAT_VERSION}; re-run `astrai prepare`")
                self.objective = str(self.attrs["objective"])
                self.keys = OBJECTIVE_KEYS[self.objective]
                self.offsets = {k: f[f"{k}_offsets"][:] for k in self.keys}
                self.lengths = {k: int(f[k].shape[0]) for k in self.keys}
        except OSError as e:
            raise ValueError(f"{self.path} is not an HDF5 file written by `astrai prepare`: {e}") from None
        if objective is not None and objective != self.objective:
            raise ValueError(f"{self.path} holds {self.objective!r} data, but the {objective!r} objective "
                             f"needs data prepared with `astrai prepare {objective}`")
        file_hash = str(self.attrs.get("tokenizer_hash"))
        if tokenizer_hash is not None and tokenizer_hash != file_hash:
            raise ValueError(f"{self.path} was prepared with a different tokenizer (hash {file_hash}) than "
                             f"the one in use (hash {tokenizer_hash}); re-run `astrai prepare` with the "
                             "model's tokenizer")
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid = -1

    @property
    def n_segments(self) -> int:
        return len(next(iter(self.offsets.values()))) - 1

    def _dataset(self, key: str) -> h5py.Dataset:
        if self._file is None or self._pid != os.getpid():
            # The chunk cache lives in the open dataset object, so datasets are opened once per
            # process and kept; a cache bigger than h5py's 1 MiB spares re-decompressing chunks.
            self._file = h5py.File(self.path, "r", rdcc_nbytes=32 << 20, rdcc_nslots=10007)
            self._pid = os.getpid()
            self._datasets = {}
        ds = self._datasets.get(key)
        if ds is None:
            ds = self._datasets[key] = self._file[key]
        return ds

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of the flat, concatenated `key` dataset."""
        return self._dataset(key)[start:stop]

    def segment(self, key: str, i: int) -> np.ndarray:
        off = self.offsets[key]
        return self.read(key, int(off[i]), int(off[i + 1]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_datasets"], state["_pid"] = None, {}, -1
        return state

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._datasets = None, {}
