"""Training, round trips, special tokens, save/load and loader errors of astrai's tokenizer."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from astrai_train.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
MIXED = [
    "To be, or not to be: that is the question.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "emoji 🌍🎉👩‍👩‍👧 flags 🇨🇳 and ZWJ, combining é (e\u0301)",
    "  leading spaces\n\n\ttabs\r\nCRLF and trailing   ",
    "\x00\x01 control \u2028 separators \ufeff BOM \ufffd replacement",
    "",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # One play (~150 KB of text) is plenty for 600 tokens and trains in a fraction of a second.
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer([SHAKESPEARE / "hamlet_gut.txt.gz"], 600, out)


@pytest.mark.parametrize("text", MIXED)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_trained_vocabulary_merges_english(tok: Tokenizer) -> None:
    # Byte fallback alone would need one token per character; a trained BPE compresses English.
    text = "What a piece of work is a man, how noble in reason"
    assert tok.vocab_size == 600
    assert len(tok.encode(text)) < len(text) / 2
    # Chinese never occurs in Hamlet, so each character stays three byte tokens.
    assert len(tok.encode("明月")) == 6


def test_special_token_ids_and_roles(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 1, 2)
    assert tok.stop_ids == {0, 4}
    assert tok.end_of_turn_id == 4
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.convert_ids_to_tokens([3, 4]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"


def test_encode_adds_no_specials_but_recognises_them_in_text(tok: Tokenizer) -> None:
    assert 0 not in tok.encode("plain text") and 1 not in tok.encode("plain text")
    ids = tok.encode("a<|im_start|>user\nhi<|im_end|><|endoftext|>")
    assert ids.count(3) == 1 and ids.count(4) == 1 and ids[-1] == 0
    assert tok.decode(ids) == "auser\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_start|>user\nhi<|im_end|><|endoftext|>"
    assert tok.encode_batch(["a<|im_end|>", "明"]) == [tok.encode("a<|im_end|>"), tok.encode("明")]


def test_save_load_keeps_hash_and_encodings(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "copy")
    again = Tokenizer.from_pretrained(tmp_path / "copy")
    assert again.hash == tok.hash and len(tok.hash) == 64
    for text in MIXED:
        assert again.encode(text) == tok.encode(text)
    assert (again.eos_id, again.bos_id, again.pad_id, again.stop_ids) == (tok.eos_id, tok.bos_id, tok.pad_id, tok.stop_ids)
    assert again.chat_template == tok.chat_template and again.model_max_length == 32768
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["added_tokens_decoder"]["4"]["content"] == "<|im_end|>"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|begin_of_text|>", "<|endoftext|>", "<|pad|>")


def test_hash_changes_with_vocabulary_and_roles(tok: Tokenizer, tmp_path: Path) -> None:
    other = train_tokenizer([SHAKESPEARE / "hamlet_gut.txt.gz"], 601, tmp_path / "other")
    assert other.hash != tok.hash
    tok.save_pretrained(tmp_path / "roles")
    config_path = tmp_path / "roles" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = "<|im_end|>"
    config_path.write_text(json.dumps(config))
    changed = Tokenizer.from_pretrained(tmp_path / "roles")
    assert changed.eos_id == 4 and changed.hash != tok.hash


def test_trains_on_plain_and_gz_files_with_chinese(tmp_path: Path) -> None:
    plain = tmp_path / "zh.txt"
    plain.write_text("明月几时有，把酒问青天。\n" * 50 + "不知天上宫阙，今夕是何年。\n" * 50, encoding="utf-8")
    packed = tmp_path / "en.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("the quick brown fox jumps over the lazy dog\n" * 100)
    tok = train_tokenizer([plain, packed], 400, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    # Frequent Chinese characters get merged out of their three bytes.
    assert len(tok.encode("明月几时有")) < 15
    assert len(tok.encode("the quick brown fox")) <= 4


def test_bad_training_arguments(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    with pytest.raises(ValueError, match=f"vocab_size 200 is too small.*at least {MIN_VOCAB_SIZE}"):
        train_tokenizer([text], 200, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([text, tmp_path / "missing.txt"], 300, tmp_path / "out")
    with pytest.raises(ValueError, match="no input files"):
        train_tokenizer([], 300, tmp_path / "out")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        train_tokenizer([latin1], 300, tmp_path / "out")


def test_loader_errors_name_the_path(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json in .*empty"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    tok.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        Tokenizer.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="encode\\(\\) takes a str, got list"):
        tok.encode(["not", "text"])  # type: ignore[arg-type]


def test_missing_config_falls_back_to_defaults(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "bare")
    (tmp_path / "bare" / "tokenizer_config.json").unlink()
    bare = Tokenizer.from_pretrained(tmp_path / "bare")
    assert bare.eos_id == 0 and bare.bos_id is None and bare.pad_id == 0
    assert bare.encode("明月 hello") == tok.encode("明月 hello")
