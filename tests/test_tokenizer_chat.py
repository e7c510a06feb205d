"""Chat templates: ChatML default, a model's own template, validation and assistant loss masks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from astrai_train.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "shakespeare"

from tokenizer_support import CONVERSATION, QWEN3_STYLE  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer([SHAKESPEARE / "macbeth_gut.txt.gz"], 600, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qwen_style(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    out = tok.save_pretrained(tmp_path_factory.mktemp("qwen"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(chat_template=QWEN3_STYLE, eos_token={"content": "<|im_end|>"}, pad_token="<|endoftext|>", bos_token=None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_pretrained(out)


def masked_pieces(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded runs of consecutive masked tokens."""
    pieces, run = [], []
    for i, m in zip(ids, mask):
        if m:
            run.append(i)
        elif run:
            pieces.append(tok.decode(run, skip_special_tokens=False))
            run = []
    if run:
        pieces.append(tok.decode(run, skip_special_tokens=False))
    return pieces


def test_default_chatml_rendering(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a terse bard.<|im_end|>\n"
        "<|im_start|>user\nSpeak of the moon.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)
    assert ids == tok.encode(text) and ids.count(3) == 3 and ids.count(4) == 2 and ids[-1] == tok.encode("\n")[0]


def test_encode_chat_masks_assistant_content_and_end_of_turn(tok: Tokenizer) -> None:
    ids, mask = tok.encode_chat(CONVERSATION)
    assert ids == tok.apply_chat_template(CONVERSATION)
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    assert masked_pieces(tok, ids, mask) == ["She waxes pale.<|im_end|>", "明月几时有 🌕<|im_end|>"]
    # The role header and the newline after <|im_end|> are template text, never trained on.
    header = tok.encode("<|im_start|>assistant\n")
    first = ids.index(3, ids.index(3, ids.index(3) + 1) + 1)  # third <|im_start|>
    assert ids[first:first + len(header)] == header and mask[first:first + len(header)] == [0] * len(header)
    assert all(m == 0 for i, m in zip(ids, mask) if i == 3)
    assert mask[-1] == 0 and mask[-2] == 1 and ids[-2] == 4


def test_encode_chat_short_and_empty_assistant_content(tok: Tokenizer) -> None:
    # "a" occurs inside the header "assistant": the mask must still point at the content.
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}]
    ids, mask = tok.encode_chat(messages)
    assert masked_pieces(tok, ids, mask) == ["a<|im_end|>", "<|im_end|>"]
    assert sum(mask) == len(tok.encode("a")) + 2


def test_model_template_wins_and_masks_follow_it(qwen_style: Tokenizer) -> None:
    assert qwen_style.eos_id == 4 and qwen_style.pad_id == 0 and qwen_style.bos_id is None
    assert qwen_style.stop_ids == {0, 4}
    text = qwen_style.apply_chat_template(CONVERSATION, tokenize=False)
    assert "<|im_start|>assistant\nShe waxes pale.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n明月几时有 🌕<|im_end|>\n")
    prompt = qwen_style.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False,
                                            enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    ids, mask = qwen_style.encode_chat(CONVERSATION)
    assert ids == qwen_style.apply_chat_template(CONVERSATION)
    # The empty think block is template text: only the content and <|im_end|> are masked.
    assert masked_pieces(qwen_style, ids, mask) == ["She waxes pale.<|im_end|>", "明月几时有 🌕<|im_end|>"]


def test_qwen_style_reasoning_is_generated_text(qwen_style: Tokenizer) -> None:
    messages = CONVERSATION[:4] + [{"role": "assistant", "content": "<think>\nrecall Su Shi\n</think>\n\n明月"}]
    ids, mask = qwen_style.encode_chat(messages)
    pieces = masked_pieces(qwen_style, ids, mask)
    assert pieces[0] == "She waxes pale.<|im_end|>"
    # The template opens <think> itself; everything the model writes after that is masked.
    assert pieces[1] == "recall Su Shi\n</think>\n\n明月<|im_end|>"


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], r"message 1 has role 'robot'; allowed roles are system, user, assistant, tool"),
        ([{"role": "user", "content": None}], r"message 0 \(user\) content must be a string, got NoneType"),
        ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}], r"message 0 \(user\) has tool_calls"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}], r"tool_calls\[0\] must be a dict with a function name"),
        ([{"role": "user"}], r"message 0 has no 'content'"),
        ([{"content": "hi"}], r"message 0 has no 'role'"),
        ([{"role": "user", "content": ["a"]}], r"message 0 \(user\) content must be a string, got list"),
        (["hello"], r"message 0 must be a dict"),
        ("hello", r"messages must be a list"),
    ],
)
def test_bad_messages_are_rejected(tok: Tokenizer, messages: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=error):
        tok.encode_chat(messages)  # type: ignore[arg-type]


def test_template_errors_become_value_errors(tok: Tokenizer, tmp_path: Path) -> None:
    out = tok.save_pretrained(tmp_path / "strict")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    strict = Tokenizer.from_pretrained(out)
    assert strict.apply_chat_template([{"role": "user", "content": "é<"}], tokenize=False) == '"é<"'
    with pytest.raises(ValueError, match="first message must be user"):
        strict.apply_chat_template([{"role": "system", "content": "x"}])
    # A template that never closes assistant turns cannot give a loss mask.
    with pytest.raises(ValueError, match=r"message 1 \(assistant\).*no end-of-turn token '<\|im_end\|>'"):
        strict.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    config["chat_template"] = "{% for m in messages %}{{ m.content }"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="chat template is not valid jinja2"):
        Tokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escapes(tok: Tokenizer, tmp_path: Path) -> None:
    out = tok.save_pretrained(tmp_path / "evil")
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"chat template failed: access to attribute '__class__' .* is unsafe"):
        Tokenizer.from_pretrained(out).apply_chat_template([{"role": "user", "content": "x"}])
