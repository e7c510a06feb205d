"""IncrementalDetokenizer: streamed deltas equal decode(all ids), never a half character."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astrai_train.tokenizer import IncrementalDetokenizer, Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
TEXT = "Now is the winter 冬天 of our discontent 🌍🎉👩‍👩‍👧 made glorious 夏天<|im_end|> by this sun of York."


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # Trained on English only, so every Chinese character and emoji is several byte tokens.
    return train_tokenizer([SHAKESPEARE / "richard_iii_gut.txt.gz"], 600, tmp_path_factory.mktemp("tok"))


class DecodeRecorder:
    """A real tokenizer that remembers how many ids each decode() call got."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.sizes = tok, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def stream(tok: Tokenizer, ids: list[int], chunks: list[int], skip: bool = True) -> list[str]:
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    out, i, k = [], 0, 0
    while i < len(ids):
        size = chunks[k % len(chunks)]
        out.append(det.push(ids[i:i + size]))
        i, k = i + size, k + 1
    out.append(det.flush())
    return out


def test_one_token_at_a_time_never_splits_a_character(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    assert len(tok.encode("冬")) == 3 and len(tok.encode("🌍")) == 4  # really split into bytes
    for skip in (True, False):
        deltas = stream(tok, ids, [1], skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
    deltas = stream(tok, ids, [1])
    # The byte tokens of a character yield nothing until the last one, which yields it whole.
    assert "冬" in deltas and "🌍" in deltas and deltas.count("") >= 2 + 2 + 3
    assert deltas[-1] == ""  # nothing left for flush: the text ended on a complete character


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.sampled_from(list("ab ,\n明月光🌍🎉é\u0301") + ["<|im_end|>", "<|pad|>"]), max_size=40),
       chunks=st.lists(st.integers(1, 5), min_size=1, max_size=6), skip=st.booleans())
def test_deltas_concatenate_to_decode(tok: Tokenizer, pieces: list[str], chunks: list[int], skip: bool) -> None:
    ids = tok.encode("".join(pieces))
    deltas = stream(tok, ids, chunks, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_decodes_only_a_small_window(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT * 40)  # thousands of tokens
    recorder = DecodeRecorder(tok)
    det = IncrementalDetokenizer(recorder)  # type: ignore[arg-type]
    text = "".join(det.push([i]) for i in ids) + det.flush()
    assert text == tok.decode(ids)
    assert len(ids) > 1500 and max(recorder.sizes[:-1]) <= 8
    assert len(recorder.sizes) <= 4 * len(ids) + 1


def test_invalid_byte_streams_match_decode(tok: Tokenizer) -> None:
    # A random model emits byte tokens that are not UTF-8; the stream must still end up as decode()
    # shows it (with U+FFFD), and must not hold the text back forever.
    rng = random.Random(0)
    byte_ids = list(range(5, 261))  # after the 5 specials come the 256 single-byte tokens
    assert all(len(t) == 1 for t in tok.convert_ids_to_tokens(byte_ids))
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(30)]
        chunks = [rng.randrange(1, 4) for _ in range(5)]
        deltas = stream(tok, ids, chunks)
        assert "".join(deltas) == tok.decode(ids)
        assert len(deltas[-1]) <= 6  # at most three unfinished tokens wait for flush


def test_text_with_a_real_replacement_character(tok: Tokenizer) -> None:
    ids = tok.encode("bad \ufffd byte")
    assert "".join(stream(tok, ids, [1])) == "bad \ufffd byte"
