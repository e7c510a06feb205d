"""Byte-level BPE tokenizers: training, loading (ours and Hugging Face's), chat templates with
assistant loss masks, and incremental detokenization for streaming."""
from astrai_train.tokenizer.detokenizer import IncrementalDetokenizer
from astrai_train.tokenizer.files import TokenizerSettings
from astrai_train.tokenizer.specials import (
    BOS_TOKEN,
    DEFAULT_CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)
from astrai_train.tokenizer.tokenizer import Tokenizer
from astrai_train.tokenizer.trainer import MIN_VOCAB_SIZE, train_tokenizer

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END",
    "IM_START",
    "IncrementalDetokenizer",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "Tokenizer",
    "TokenizerSettings",
    "train_tokenizer",
]
