"""Incremental detokenization for streaming: token ids in, text deltas out.

Byte-level BPE splits one character across several tokens (a Chinese character is 3 bytes, an
emoji 4), so decoding a token alone can end in half a character, which decodes as U+FFFD. A
delta is only emitted up to a complete character; the bytes of an unfinished one wait for the
next push.

Cost per push is O(window), not O(sequence): the decoder sees only a few already-emitted tokens
(context, because some decoders - e.g. SentencePiece-style ones - change a token's text depending
on what precedes it) plus the tokens not yet emitted.
"""
from __future__ import annotations

from typing import Iterable

from astrai_train.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 4  # emitted tokens kept as decoding context
_MAX_PARTIAL_TOKENS = 3  # an unfinished UTF-8 character has at most 3 bytes, so at most 3 tokens


class IncrementalDetokenizer:
    """Feed ids with push(); concatenating every delta plus flush() equals
    tokenizer.decode(all ids) for any ids that decode to valid UTF-8 (and, as tested on random
    byte streams, for invalid bytes too, which both show as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # context tokens (already emitted) followed by pending tokens
        self._n_context = 0  # how many of _ids are context
        self._context_text = ""  # decode(_ids[:_n_context])

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _emit(self, cut: int, text: str) -> str:
        """Emit the text of _ids[:cut] beyond the context; the emitted tail becomes the context."""
        delta = text[len(self._context_text):]
        start = max(self._n_context, cut - _CONTEXT_TOKENS)
        self._ids = self._ids[start:]
        self._n_context = cut - start
        self._context_text = self._decode(self._ids[: self._n_context])
        return delta

    def push(self, new_ids: Iterable[int]) -> str:
        """Add generated ids; return the text that is now final (possibly "")."""
        self._ids.extend(new_ids)
        n = len(self._ids)
        if n == self._n_context:
            return ""
        text = self._decode(self._ids)
        if not text.endswith(_REPLACEMENT):
            return self._emit(n, text)
        # The tail may be half a character: emit up to the last point that decodes cleanly.
        for cut in range(n - 1, max(self._n_context, n - _MAX_PARTIAL_TOKENS - 1), -1):
            prefix = self._decode(self._ids[:cut])
            if not prefix.endswith(_REPLACEMENT):
                return self._emit(cut, prefix)
        if n - self._n_context <= _MAX_PARTIAL_TOKENS:
            return ""  # all pending tokens may still be one character in the making
        # No clean point among the last few tokens, yet more are pending than one unfinished
        # character needs: the older ones hold invalid bytes, which decode() shows as U+FFFD
        # however the stream continues. Emit them; keep the last few, which may still complete.
        cut = n - _MAX_PARTIAL_TOKENS
        return self._emit(cut, self._decode(self._ids[:cut]))

    def flush(self) -> str:
        """Everything not yet emitted (an unfinished character comes out as U+FFFD); resets."""
        text = self._decode(self._ids)
        delta = text[len(self._context_text):]
        self._ids, self._n_context, self._context_text = [], 0, ""
        return delta


def push_many(detoks: list[IncrementalDetokenizer], new_ids: list[list[int]]) -> list[str]:
    """`[d.push(ids) for d, ids in zip(detoks, new_ids)]`, with the same results, but decoding
    all of them in two batched calls into the tokenizer (a serving engine pushes one token into
    each of hundreds of streams per step; per-stream calls cost more than the decoding)."""
    out = [""] * len(detoks)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (d, ids) in enumerate(zip(detoks, new_ids)):
        backend = getattr(d._tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "decode_batch"):
            out[i] = d.push(ids)
            continue
        groups.setdefault((id(backend), d._skip), []).append(i)
    for (_, skip), members in groups.items():
        backend = detoks[members[0]]._tokenizer.backend
        live = []
        for i in members:
            d = detoks[i]
            d._ids.extend(new_ids[i])
            if len(d._ids) != d._n_context:
                live.append(i)
        texts = backend.decode_batch([detoks[i]._ids for i in live], skip_special_tokens=skip)
        clean = []
        for i, text in zip(live, texts):
            d = detoks[i]
            if text.endswith(_REPLACEMENT):   # half a character at the end: push's slow path
                del d._ids[len(d._ids) - len(new_ids[i]):]
                out[i] = d.push(new_ids[i])
                continue
            n = len(d._ids)                   # push's _emit(n, text), context decoded below
            out[i] = text[len(d._context_text):]
            start = max(d._n_context, n - _CONTEXT_TOKENS)
            d._ids = d._ids[start:]
            d._n_context = n - start
            clean.append(i)
        contexts = backend.decode_batch([detoks[i]._ids for i in clean], skip_special_tokens=skip)
        for i, text in zip(clean, contexts):
            detoks[i]._context_text = text
    return out
