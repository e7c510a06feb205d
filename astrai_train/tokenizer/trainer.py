"""Train a byte-level BPE tokenizer with the `tokenizers` library.

Byte-level means the base alphabet is the 256 bytes: any text (Chinese, emoji, control
characters) encodes without unknown tokens and decodes back exactly. No normalizer runs, since
NFC/NFKC would change the text and break that round trip.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from astrai_train.tokenizer.files import TokenizerSettings
from astrai_train.tokenizer.specials import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from astrai_train.tokenizer.tokenizer import Tokenizer

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
_CHUNK_CHARS = 1 << 16  # text handed to the trainer per item: big enough to batch, split at line ends


def _open_text(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 file, gzipped or not (told apart by the gzip magic, not the suffix)."""
    with path.open("rb") as raw:
        magic = raw.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
            yield from f
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable gzip file: {e}") from None


def _chunks(paths: Iterable[Path]) -> Iterator[str]:
    # Whole lines grouped into ~64 KB pieces: multi-line whitespace ("\n\n", indentation after a
    # newline) stays inside one piece so BPE can learn it, and the Rust side gets few large items.
    for path in paths:
        buf: list[str] = []
        size = 0
        for line in _open_text(path):
            buf.append(line)
            size += len(line)
            if size >= _CHUNK_CHARS:
                yield "".join(buf)
                buf, size = [], 0
        if buf:
            yield "".join(buf)


def check_inputs(files: Sequence[str | Path], vocab_size: int) -> list[Path]:
    """Validate arguments before any work; errors name the bad value."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if isinstance(files, (str, Path)):
        files = [files]
    if not files:
        raise ValueError("no input files given to train the tokenizer on")
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"tokenizer training input not found: {path}")
        if not path.is_file():
            raise ValueError(f"tokenizer training input {path} is not a file")
    return paths


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_dir: str | Path, *,
                    min_frequency: int = 2, model_max_length: int | None = 32768,
                    chat_template: str | None = None) -> Tokenizer:
    """Train byte-level BPE on text files (.gz or plain) and save it into out_dir.

    Special tokens get the first ids: <|endoftext|>=0 (eos), <|begin_of_text|>=1 (bos),
    <|pad|>=2, <|im_start|>=3, <|im_end|>=4 (end of turn). The vocabulary may come out smaller
    than vocab_size when the corpus has too few distinct pairs.
    """
    paths = check_inputs(files, vocab_size)
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_chunks(paths), trainer=trainer)
    settings = TokenizerSettings(eos_token=EOS_TOKEN, bos_token=BOS_TOKEN, pad_token=PAD_TOKEN,
                                 chat_template=chat_template, model_max_length=model_max_length)
    tokenizer = Tokenizer(backend, settings)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
