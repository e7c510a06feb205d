"""Special tokens and the default chat template of astrai tokenizers.

The names follow the conventions the big open models use (GPT/Qwen ChatML, Llama-3 BOS), so a
tokenizer trained here reads naturally next to theirs and HF tooling recognises the roles.
"""
from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"  # ends a document; the separator between packed pretraining documents
BOS_TOKEN = "<|begin_of_text|>"  # optional document start (encode() never adds it on its own)
PAD_TOKEN = "<|pad|>"  # fills batches; never trained on
IM_START = "<|im_start|>"  # opens a chat turn: <|im_start|>{role}\n
IM_END = "<|im_end|>"  # closes a chat turn; the token an assistant must learn to emit

# In id order: a freshly trained tokenizer gives these ids 0..4, before the 256 byte tokens.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

# Tokens that close one assistant turn, most specific first. The first one in a vocabulary is the
# end-of-turn token that encode_chat puts in the loss mask; the model's eos is used when none is.
END_OF_TURN_TOKENS: tuple[str, ...] = (IM_END, "<|eot_id|>")

# Tokens that also end generation when present (besides the configured eos): a model trained on
# packed documents emits the document end, a chat model emits the end of turn.
STOP_TOKENS: tuple[str, ...] = (IM_END, EOS_TOKEN, "<|eot_id|>", "<|end_of_text|>")

# ChatML, the format Qwen and many others use. The trailing newline after <|im_end|> is template
# text (not trained on); the generation prompt opens the assistant turn the model must complete.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Roles a chat message may have. Tool calls are out of scope for now, so a "tool" message is an
# error rather than something a template would silently mangle.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
