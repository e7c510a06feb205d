"""Datasets over prepared HDF5 files, and the collates that pad them.

SEQ and SFT read the concatenated token stream as overlapping windows that ignore segment
boundaries (packing): window i starts at token i * stride and holds window_size + 1 tokens,

    input_ids  = stream[s     : s + W]
    target_ids = stream[s + 1 : s + W + 1]
    loss_mask  = mask  [s + 1 : s + W + 1]     (SFT: aligned with the targets; off for the example
                                                the window cuts off from its start, see SFTDataset)

so there are (n_tokens - W - 1) // stride + 1 windows; a tail shorter than a stride is dropped.

SFT can mix in plain text (TextMixDataset): a share of its windows are pretraining windows with
the loss on every token, so fine-tuning on replies does not wipe out how to continue raw text.

DPO and GRPO items are whole examples; their collates pad (with the pad id recorded in the file)
and build the masks. DPO pads chosen and rejected to one length so an objective can run both in
one forward pass.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .h5store import TokenStore


def num_windows(n_tokens: int, window_size: int, stride: int) -> int:
    """How many full windows (of window_size inputs plus one target) fit in n_tokens."""
    if window_size < 1 or stride < 1:
        raise ValueError(f"window_size and stride must be >= 1, got {window_size} and {stride}")
    return 0 if n_tokens < window_size + 1 else (n_tokens - window_size - 1) // stride + 1


def _ids(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.astype(np.int64))


class _WindowDataset(Dataset):
    objective = ""

    def __init__(self, path: str | Path, window_size: int, stride: int | None = None,
                 tokenizer_hash: str | None = None) -> None:
        self.store = TokenStore(path, self.objective, tokenizer_hash)
        self.window_size = window_size
        self.stride = stride or window_size
        self.n_tokens = self.store.lengths["sequence"]
        self._len = num_windows(self.n_tokens, window_size, self.stride)
        if self._len == 0:
            raise ValueError(f"{path} holds {self.n_tokens} tokens, fewer than one window of "
                             f"window_size={window_size} + 1; lower window_size or prepare more data")

    def __len__(self) -> int:
        return self._len

    def _span(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        start = i * self.stride
        return start, start + self.window_size + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start, stop = self._span(i)
        tokens = _ids(self.store.read("sequence", start, stop))
        return {"input_ids": tokens[:-1], "target_ids": tokens[1:]}


class SeqDataset(_WindowDataset):
    """Pretraining windows: input_ids and target_ids (LongTensor[window_size])."""

    objective = "seq"


class SFTDataset(_WindowDataset):
    """SFT windows: input_ids, target_ids and loss_mask (BoolTensor, True where the target is an
    assistant token, so the loss covers replies and never prompts or template tokens).

    A window that starts inside an example holds that example's reply without the start of its
    prompt; the reply's tokens get no loss there (they do in the window that holds the example's
    start), or the model would learn to answer questions it was not shown: for a sum cut before
    its numbers, an answer made up from memory. So an example longer than a window is trained on
    only as far as the window holding its start reaches; a stride below window_size covers more."""

    objective = "sft"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._starts = self.store.offsets["sequence"]  # stream position where each example begins

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        start, stop = self._span(i)
        mask = self.store.read("loss_mask", start + 1, stop).astype(np.bool_)
        # The example holding stream position `start` began at or before it; if before, its
        # targets (stream positions start+1 .. its end) are cut off from their prompt.
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        if self._starts[k] < start:
            mask[:max(0, int(self._starts[k + 1]) - start - 1)] = False
        item["loss_mask"] = torch.from_numpy(mask)
        return item


class TextMixDataset(Dataset):
    """SFT windows followed by plain-text windows, these with loss_mask all True, so that
    `fraction` of the items are text: len = n_sft + n_text with n_text / len ~= fraction. The
    text windows are spread evenly over the text file (every part of the corpus, not its first
    pages) and repeat only when more are asked for than it holds; the sampler shuffles them in.
    A text window weighs more in the loss than an SFT window of replies (every one of its tokens
    counts), so a small fraction already holds perplexity."""

    def __init__(self, sft: SFTDataset, text: SeqDataset, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"text fraction must be in [0, 1), got {fraction}")
        if text.window_size != sft.window_size:
            raise ValueError(f"text windows ({text.window_size} tokens) must match the SFT windows ({sft.window_size})")
        self.sft, self.text, self.fraction = sft, text, fraction
        self.store = sft.store  # pad id and the rest of the file's attributes: the SFT file's
        self.n_text = round(len(sft) * fraction / (1.0 - fraction))

    def __len__(self) -> int:
        return len(self.sft) + self.n_text

    def text_index(self, j: int) -> int:
        """Which window of the text file the j-th text item is."""
        n = len(self.text)
        return j * n // self.n_text if self.n_text <= n else j % n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        if i < len(self.sft):
            return self.sft[i]
        item = self.text[self.text_index(i - len(self.sft))]
        item["loss_mask"] = torch.ones(len(item["target_ids"]), dtype=torch.bool)
        return item


class DPODataset(Dataset):
    """One preference pair per item: prompt_ids, chosen_ids/chosen_mask, rejected_ids/rejected_mask.
    chosen_ids and rejected_ids are whole sequences (prompt + completion); their masks are True on
    the completion's tokens. max_length cuts sequences from the right."""

    def __init__(self, path: str | Path, tokenizer_hash: str | None = None, max_length: int | None = None) -> None:
        self.store = TokenStore(path, "dpo", tokenizer_hash)
        self.max_length = max_length

    def __len__(self) -> int:
        return self.store.n_segments

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        cut = slice(0, self.max_length)
        seg = self.store.segment
        return {"prompt_ids": _ids(seg("prompt", i)),
                "chosen_ids": _ids(seg("chosen", i)[cut]),
                "chosen_mask": torch.from_numpy(seg("chosen_mask", i)[cut].astype(np.bool_)),
                "rejected_ids": _ids(seg("rejected", i)[cut]),
                "rejected_mask": torch.from_numpy(seg("rejected_mask", i)[cut].astype(np.bool_))}


class GRPODataset(Dataset):
    """One prompt per item: prompt_ids (the chat template up to the assistant's turn) and the
    answer string that reward functions check."""

    def __init__(self, path: str | Path, tokenizer_hash: str | None = None) -> None:
        self.store = TokenStore(path, "grpo", tokenizer_hash)

    def __len__(self) -> int:
        return self.store.n_segments

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range [0, {len(self)})")
        return {"prompt_ids": _ids(self.store.segment("prompt", i)),
                "answer": self.store.segment("answer", i).tobytes().decode("utf-8")}


def _pad(seqs: list[torch.Tensor], length: int, value: int, left: bool = False) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=seqs[0].dtype)
    for row, s in enumerate(seqs):
        if left:
            out[row, length - len(s):] = s
        else:
            out[row, : len(s)] = s
    return out


def collate_dpo(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] tensors, T the longest chosen or rejected sequence:
    {chosen,rejected}_ids (pad_id), _attention_mask (True on real tokens), _loss_mask (True on
    completion tokens: the log-prob of ids[:, t] given ids[:, :t] counts where loss_mask[:, t])."""
    length = max(max(len(b["chosen_ids"]), len(b["rejected_ids"])) for b in batch)
    out: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        ids = [b[f"{side}_ids"] for b in batch]
        out[f"{side}_ids"] = _pad(ids, length, pad_id)
        out[f"{side}_attention_mask"] = _pad([torch.ones(len(s), dtype=torch.bool) for s in ids], length, False)
        out[f"{side}_loss_mask"] = _pad([b[f"{side}_mask"] for b in batch], length, False)
    out["prompt_lengths"] = torch.tensor([len(b["prompt_ids"]) for b in batch])
    return out


def collate_grpo(batch: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """prompt_ids [B, T] left-padded (generation appends on the right), attention_mask,
    prompt_lengths, prompts (unpadded id lists, what the serving engine takes) and answers."""
    prompts = [b["prompt_ids"] for b in batch]
    length = max(len(p) for p in prompts)
    return {"prompt_ids": _pad(prompts, length, pad_id, left=True),
            "attention_mask": _pad([torch.ones(len(p), dtype=torch.bool) for p in prompts], length, False, left=True),
            "prompt_lengths": torch.tensor([len(p) for p in prompts]),
            "prompts": [p.tolist() for p in prompts],
            "answers": [b["answer"] for b in batch]}


def build_dataset(objective: str, path: str | Path, window_size: int, stride: int | None,
                  tokenizer_hash: str | None, max_length: int | None = None,
                  text_path: str | Path | None = None, text_fraction: float = 0.0) -> Dataset:
    if objective == "seq":
        return SeqDataset(path, window_size, stride, tokenizer_hash)
    if objective == "sft":
        sft = SFTDataset(path, window_size, stride, tokenizer_hash)
        if text_path is None or text_fraction == 0:
            return sft
        return TextMixDataset(sft, SeqDataset(text_path, window_size, None, tokenizer_hash), text_fraction)
    if objective == "dpo":
        return DPODataset(path, tokenizer_hash, max_length)
    if objective == "grpo":
        return GRPODataset(path, tokenizer_hash)
    raise ValueError(f"unknown objective {objective!r}; expected seq, sft, dpo or grpo")


def collate_for(objective: str, pad_id: int) -> Callable | None:
    """The collate of an objective (None: the default stacking, for fixed-size windows)."""
    return {"dpo": partial(collate_dpo, pad_id=pad_id), "grpo": partial(collate_grpo, pad_id=pad_id)}.get(objective)
