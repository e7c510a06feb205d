"""The tokenizer as a grammar engine sees it: each token id's bytes, which ids are special, which end.

A grammar matches bytes, so every token id needs the exact bytes it stands for. `tokenizers`
stores them in one of two spellings, told apart by the file's decoder:
- byte-level BPE (GPT-2, Qwen, Llama-3, ours): each byte is one printable stand-in character
  ("Ġ" for a space), undone through the GPT-2 byte table;
- SentencePiece-style (Llama-2, Mistral): "▁" for a space and byte-fallback tokens "<0x0A>".
Added tokens are their content, as text. Ids past the tokenizer's vocabulary (a model's embedding
padded to a multiple of 64) get no bytes: no grammar can ever allow them.

Special tokens (eos, <|im_end|>, ...) are not text: a grammar never spells them with characters,
so a JSON string can never contain "<|im_end|>". Non-special added tokens (Qwen's <tool_call>)
are text like any other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    kinds = {decoder.get("type", "")}
    for d in decoder.get("decoders", []) or []:
        kinds |= _decoder_kinds(d)
    return kinds


def token_bytes(tokenizer: Any, n_vocab: int | None = None) -> list[bytes]:
    """The bytes of every id in [0, n_vocab) (default: the tokenizer's vocabulary size)."""
    backend = tokenizer.backend
    n_vocab = tokenizer.vocab_size if n_vocab is None else n_vocab
    kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
    table = _byte_level_table() if "ByteLevel" in kinds else None
    added = backend.get_added_tokens_decoder()
    out: list[bytes] = []
    for i in range(n_vocab):
        if i in added:
            out.append(added[i].content.encode("utf-8"))
            continue
        piece = backend.id_to_token(i)
        if piece is None:
            out.append(b"")
        elif table is not None:
            try:
                out.append(bytes(table[c] for c in piece))
            except KeyError:           # not a byte-level spelling after all: take it as text
                out.append(piece.encode("utf-8"))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out


@dataclass(frozen=True)
class VocabInfo:
    """What the grammar engine needs of the tokenizer (built once per engine)."""

    tokens: list[bytes]            # per id in [0, vocab_size): its bytes ("" for ids the tokenizer lacks)
    special_ids: frozenset[int]    # special added tokens: never text
    eos_ids: frozenset[int]        # the ids that end a sample (eos, end of turn): allowed once the grammar is complete
    vocab_size: int                # the model's vocabulary (the logits' width), >= the tokenizer's

    @classmethod
    def of(cls, tokenizer: Any, vocab_size: int) -> "VocabInfo":
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} logits")
        special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        return cls(token_bytes(tokenizer, vocab_size), frozenset(special),
                   frozenset(i for i in tokenizer.stop_ids if i < vocab_size), vocab_size)
