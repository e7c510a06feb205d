"""Tokenizer: a `tokenizers` BPE model plus special-token roles and a chat template.

Loads our own directories and Hugging Face ones (Qwen3, Llama-3, ...) alike; the files are the
HF layout (see files.py), so what we save `transformers` loads too.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import tokenizers

from astrai_train.tokenizer import chat, files
from astrai_train.tokenizer.specials import DEFAULT_CHAT_TEMPLATE, END_OF_TURN_TOKENS, EOS_TOKEN, STOP_TOKENS


class Tokenizer:
    """Text <-> token ids. encode() adds no special tokens, but special-token strings inside the
    text become their ids (chat templates rely on that)."""

    def __init__(self, backend: tokenizers.Tokenizer, settings: files.TokenizerSettings) -> None:
        self._backend = backend
        if settings.eos_token is None:
            inferred = next((t for t in (EOS_TOKEN, "<|end_of_text|>", "</s>") if backend.token_to_id(t) is not None), None)
            if inferred is None:
                raise ValueError("the tokenizer names no eos_token and its vocabulary has none of the usual ones")
            settings = replace(settings, eos_token=inferred)
        self._settings = settings
        self._eos_id = self._require_id(settings.eos_token, "eos_token")
        self._bos_id = self._require_id(settings.bos_token, "bos_token") if settings.bos_token else None
        # Without a pad token, padding with eos is the usual choice: padded positions are masked anyway.
        self._pad_id = self._require_id(settings.pad_token, "pad_token") if settings.pad_token else self._eos_id
        present = [backend.token_to_id(t) for t in STOP_TOKENS]
        self._stop_ids = frozenset([self._eos_id, *settings.extra_eos_ids, *(i for i in present if i is not None)])
        self._end_of_turn = next((t for t in END_OF_TURN_TOKENS if backend.token_to_id(t) is not None), settings.eos_token)
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # Model embeddings must cover every id, so count up to the largest id even if ids have gaps.
        self._vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    def _require_id(self, token: str, role: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Tokenizer":
        """Load a directory holding tokenizer.json (+ tokenizer_config.json), ours or HF's."""
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        if not directory.is_dir():
            raise ValueError(f"{directory} is a file; pass the directory that holds {files.TOKENIZER_FILE}")
        path = directory / files.TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {files.TOKENIZER_FILE} in {directory} (looked for {path})")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"{path} is not a valid tokenizers file: {e}") from None
        # transformers adds config-only added tokens on load; do the same so ids agree with it.
        for token_id, entry in sorted(files.added_tokens_from_config(directory).items()):
            if backend.token_to_id(entry["content"]) is None:
                token = tokenizers.AddedToken(entry["content"], special=bool(entry.get("special", False)),
                                              normalized=bool(entry.get("normalized", False)))
                backend.add_tokens([token])
                if backend.token_to_id(entry["content"]) != token_id:
                    raise ValueError(f"{directory / files.CONFIG_FILE}: added token {entry['content']!r} "
                                     f"declares id {token_id} but would get {backend.token_to_id(entry['content'])}")
        try:
            return cls(backend, files.read_settings(directory))
        except ValueError as e:
            raise ValueError(f"{directory}: {e}") from None

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / files.TOKENIZER_FILE))
        added = {
            i: {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                "single_word": t.single_word, "special": t.special}
            for i, t in self._backend.get_added_tokens_decoder().items()
        }
        files.write_config(directory, self._settings, self.chat_template, added)
        return directory

    # ---- properties ---------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch encoding with offsets and the like)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def __len__(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_token(self) -> str | None:
        return self._settings.bos_token

    @property
    def eos_token(self) -> str:
        return self._settings.eos_token  # type: ignore[return-value]  # filled in by __init__

    @property
    def pad_token(self) -> str | None:
        return self._settings.pad_token

    @property
    def stop_ids(self) -> set[int]:
        """Ids that end generation: eos, end of turn and document end when the vocabulary has them."""
        return set(self._stop_ids)

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special tokens (what decode(skip_special_tokens=True) drops)."""
        return set(self._special_ids)

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn (<|im_end|> for ChatML)."""
        return self._require_id(self._end_of_turn, "end-of-turn token")

    @property
    def chat_template(self) -> str:
        return self._settings.chat_template or DEFAULT_CHAT_TEMPLATE

    @property
    def model_max_length(self) -> int | None:
        return self._settings.model_max_length

    @cached_property
    def hash(self) -> str:
        """sha256 over the vocabulary, merges and special tokens: equal hashes tokenize equally, so
        data tokenized earlier can be checked against the model's tokenizer."""
        model = json.loads(self._backend.to_str())["model"]
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
        vocab = model.get("vocab")
        canonical = {
            "type": model.get("type"),
            "vocab": sorted(vocab.items(), key=lambda kv: kv[1]) if isinstance(vocab, dict) else vocab,
            "merges": merges,
            "added": sorted((i, t.content, t.special) for i, t in self._backend.get_added_tokens_decoder().items()),
            "roles": [self._settings.bos_token, self._settings.eos_token, self._settings.pad_token],
        }
        blob = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, bos={self.bos_token!r}, "
                f"pad={self.pad_token!r}, hash={self.hash[:12]})")

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. add_special_tokens: let the backend's post-processor add its tokens
        (a BOS for imported Llama tokenizers; astrai's own tokenizers have no post-processor)."""
        if not isinstance(text, str):
            raise ValueError(f"encode() takes a str, got {type(text).__name__}: {text!r:.80}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() over many texts, in parallel on the Rust side."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"encode_batch() text {i} is a {type(text).__name__}, not a str")
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are skipped (a model's embedding may be padded
        past the tokenizer's vocabulary)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> Any:
        """Token strings (byte-level symbols such as 'Ġ' for space); one id gives one string."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    # ---- chat ---------------------------------------------------------------------------------

    def _template_variables(self, extra: dict[str, Any]) -> dict[str, Any]:
        # The same names transformers passes, so templates that test `tools is none` agree with it.
        names = {"bos_token": self.bos_token or "", "eos_token": self.eos_token, "pad_token": self.pad_token or "",
                 "tools": None, "documents": None}
        return {**names, **extra}

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, *, tools: Sequence[dict[str, Any]] | None = None,
                            continue_final_message: bool = False, **template_kwargs: Any) -> list[int] | str:
        """Render messages with the chat template; token ids (default) or the text. As in
        transformers: `tools` (JSON-schema dicts) reach the template as `tools`, and
        continue_final_message ends the text inside the last message for the model to continue it.
        Extra keyword arguments reach the template as variables (e.g. enable_thinking=False for Qwen3)."""
        plain = chat.validate_messages(messages)
        variables = self._template_variables(chat.plain_data(template_kwargs, "template argument"))
        if tools is not None:
            variables["tools"] = chat.check_tools(tools)
        text = chat.render(self.chat_template, plain, add_generation_prompt, variables, continue_final_message)
        return self.encode(text) if tokenize else text

    @property
    def template_features(self) -> chat.TemplateFeatures:
        """Whether the chat template renders tools and tool calls, and in which format."""
        return chat.template_features(self.chat_template)

    def encode_chat(self, messages: Sequence[dict[str, Any]], *, tools: Sequence[dict[str, Any]] | None = None,
                    **template_kwargs: Any) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): ids == apply_chat_template(messages, tools=tools); the mask is 1 on
        each assistant message's content tokens (its tool calls included) and its end-of-turn
        token, 0 elsewhere."""
        plain = chat.validate_messages(messages)
        variables = self._template_variables(chat.plain_data(template_kwargs, "template argument"))
        if tools is not None:
            variables["tools"] = chat.check_tools(tools)
        text = chat.render(self.chat_template, plain, False, variables)
        encoding = self._backend.encode(text, add_special_tokens=False)
        spans = chat.assistant_char_spans(self.chat_template, plain, text, variables, self._end_of_turn)
        return encoding.ids, chat.mask_from_spans(encoding.offsets, spans)
