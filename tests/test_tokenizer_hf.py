"""Hugging Face compatibility: directories written by `transformers` load here with the same ids
and chat rendering, and directories we write load in `transformers`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

transformers = pytest.importorskip("transformers")

from astrai_train.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
from tokenizer_support import CONVERSATION, QWEN3_STYLE  # noqa: E402

TEXTS = ["Good morrow, cousin.", "明月几时有 🌕", "<|im_start|>user\nhi<|im_end|>\n<think>x</think>", " \n\t "]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer([SHAKESPEARE / "othello_gut.txt.gz"], 600, tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def hf_dir(ours: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-like directory saved by transformers itself: eos <|im_end|>, pad <|endoftext|>, no
    bos, <think> tags as added non-special tokens, the template in chat_template.jinja."""
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    hf.chat_template = QWEN3_STYLE
    out = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 0], "pad_token_id": 0}))
    return out


def check_same_as_transformers(tok: Tokenizer, hf: "transformers.PreTrainedTokenizerBase") -> None:
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    for messages, gen, extra in [(CONVERSATION, False, {}), (CONVERSATION[:4], True, {}),
                                 (CONVERSATION[:2], True, {"enable_thinking": False})]:
        text = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **extra)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **extra)
        hf_ids = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, **extra)
        hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
        assert tok.apply_chat_template(messages, add_generation_prompt=gen, **extra) == hf_ids
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id)


def test_loads_transformers_directory(hf_dir: Path) -> None:
    assert (hf_dir / "chat_template.jinja").is_file()  # transformers 5 keeps the template there
    tok = Tokenizer.from_pretrained(hf_dir)
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tok.eos_token == "<|im_end|>" and tok.bos_id is None and tok.pad_token == "<|endoftext|>"
    assert tok.stop_ids == {0, 4} and tok.vocab_size == len(hf) == 602
    assert tok.token_to_id("<think>") == 600 and 600 not in tok.special_ids
    check_same_as_transformers(tok, hf)


def test_loads_legacy_config_with_token_dicts(hf_dir: Path, tmp_path: Path) -> None:
    # Older files: the template inside tokenizer_config.json, special tokens as AddedToken dicts.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True},
        "bos_token": None,
        "chat_template": QWEN3_STYLE,
        "model_max_length": 40960,
        "clean_up_tokenization_spaces": False,
    }
    (legacy / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(legacy)
    assert tok.model_max_length == 40960 and tok.chat_template == QWEN3_STYLE
    check_same_as_transformers(tok, transformers.AutoTokenizer.from_pretrained(legacy))
    # Saving keeps keys we do not own, and the result still loads in both.
    tok.save_pretrained(tmp_path / "resaved")
    saved = json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())
    assert saved["clean_up_tokenization_spaces"] is False and saved["eos_token"] == "<|im_end|>"
    again = Tokenizer.from_pretrained(tmp_path / "resaved")
    assert again.hash == tok.hash
    check_same_as_transformers(again, transformers.AutoTokenizer.from_pretrained(tmp_path / "resaved"))


def test_transformers_loads_our_directory(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|begin_of_text|>", "<|endoftext|>", "<|pad|>")
    assert hf.model_max_length == 32768
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    for messages, gen in [(CONVERSATION, False), (CONVERSATION[:4], True)]:
        assert hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
            ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (ours.eos_id, ours.pad_id, ours.bos_id)


def test_generation_config_eos_ids_stop(hf_dir: Path, tmp_path: Path) -> None:
    # A directory whose generation_config names an extra stop id beyond the vocabulary's usual ones.
    d = tmp_path / "gen"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / name).write_bytes((hf_dir / name).read_bytes())
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [4, 601]}))
    assert Tokenizer.from_pretrained(d).stop_ids == {0, 4, 601}
