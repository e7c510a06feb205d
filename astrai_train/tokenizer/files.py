"""The files of a tokenizer directory, in the layout Hugging Face uses.

Read: `tokenizer.json` (required), `tokenizer_config.json` (special tokens, chat template; older
`special_tokens_map.json` fills gaps), `chat_template.jinja` (where transformers >= 4.50 keeps the
template) and `generation_config.json` (extra eos ids). Written: `tokenizer.json` and a
`tokenizer_config.json` that both we and `transformers` load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"

# Keys of tokenizer_config.json that TokenizerSettings owns; everything else is kept verbatim in
# `extra` so loading and saving an HF directory loses nothing.
_OWNED_KEYS = ("bos_token", "eos_token", "pad_token", "chat_template", "model_max_length",
               "tokenizer_class", "added_tokens_decoder")


@dataclass(frozen=True)
class TokenizerSettings:
    """What tokenizer.json does not say: which tokens play which role, and how to render chats."""

    eos_token: str | None  # ends a document/generation; None -> inferred from the vocabulary
    bos_token: str | None = None  # document start; None for models without one (Qwen3)
    pad_token: str | None = None  # batch filler; None -> the eos token pads
    chat_template: str | None = None  # jinja2 source; None -> the ChatML default
    model_max_length: int | None = None  # longest sequence the model was trained on, if known
    extra_eos_ids: tuple[int, ...] = ()  # generation_config.json eos ids that also stop generation
    extra: dict[str, Any] = field(default_factory=dict)  # other tokenizer_config.json keys, kept


def _token_string(value: Any, key: str, path: Path) -> str | None:
    """HF writes special tokens as strings or as AddedToken dicts {"content": ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key} must be a string or a {{'content': ...}} dict, got {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _template_from_config(value: Any, path: Path) -> str | None:
    # Older HF files store several named templates as [{"name", "template"}]; "default" is the chat one.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{path}: chat_template must be a string or a list with a 'default' entry")


def _eos_ids_from_generation_config(path: Path) -> tuple[int, ...]:
    if not path.is_file():
        return ()
    value = _read_json(path).get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    return tuple(v for v in values if isinstance(v, int))


def read_settings(directory: Path) -> TokenizerSettings:
    """Settings of a tokenizer directory; a missing tokenizer_config.json means all defaults."""
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    special_map_path = directory / SPECIAL_MAP_FILE
    special_map = _read_json(special_map_path) if special_map_path.is_file() else {}

    def token(key: str) -> str | None:
        if key in config:
            return _token_string(config[key], key, config_path)
        return _token_string(special_map.get(key), key, special_map_path)

    template = _template_from_config(config.get("chat_template"), config_path)
    template_path = directory / TEMPLATE_FILE
    if template_path.is_file():  # transformers prefers the .jinja file when both exist
        template = template_path.read_text(encoding="utf-8")
    max_len = config.get("model_max_length")
    # HF writes 1e30 for "no limit"; that is no information, not a length.
    max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
    return TokenizerSettings(
        eos_token=token("eos_token"),
        bos_token=token("bos_token"),
        pad_token=token("pad_token"),
        chat_template=template,
        model_max_length=max_len,
        extra_eos_ids=_eos_ids_from_generation_config(directory / GENERATION_FILE),
        extra={k: v for k, v in config.items() if k not in _OWNED_KEYS},
    )


def added_tokens_from_config(directory: Path) -> dict[int, dict[str, Any]]:
    """tokenizer_config.json's added_tokens_decoder ({id: {"content", "special", ...}}), if any."""
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        return {}
    table = _read_json(config_path).get("added_tokens_decoder") or {}
    try:
        return {int(k): v for k, v in table.items() if isinstance(v, dict) and "content" in v}
    except (AttributeError, ValueError):
        raise ValueError(f"{config_path}: added_tokens_decoder must map ids to token dicts") from None


def write_config(directory: Path, settings: TokenizerSettings, chat_template: str,
                 added_tokens: dict[int, dict[str, Any]]) -> Path:
    """Write tokenizer_config.json with the keys transformers reads. Returns its path."""
    config: dict[str, Any] = dict(settings.extra)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=settings.bos_token,
        eos_token=settings.eos_token,
        pad_token=settings.pad_token,
        chat_template=chat_template,
        model_max_length=settings.model_max_length if settings.model_max_length is not None else int(1e30),
        added_tokens_decoder={str(i): added_tokens[i] for i in sorted(added_tokens)},
    )
    config.setdefault("clean_up_tokenization_spaces", False)  # byte-level decoding is already exact
    path = directory / CONFIG_FILE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # A stale chat_template.jinja would win over the config in transformers; keep them in step.
    if (directory / TEMPLATE_FILE).is_file():
        (directory / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    return path
