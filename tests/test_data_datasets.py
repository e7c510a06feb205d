"""Datasets: window arithmetic across segment boundaries, mask alignment, collates, DataModule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from astrai_train.data import (AstraiDataModule, DataConfig, DPODataset, GRPODataset, SeqDataset, SFTDataset,
                               TextMixDataset, collate_dpo, collate_grpo, num_windows)
from astrai_train.data.h5store import H5Writer
from astrai_train.data.prepare import PrepareConfig, prepare

SEGMENTS = [10, 5, 1, 14]  # 30 tokens; boundaries after tokens 9, 14, 15
STARTS = np.cumsum([0, *SEGMENTS[:-1]])  # 0, 10, 15, 16


def _example_start(position: int) -> int:
    return int(STARTS[STARTS <= position].max())


def _write(path: Path, objective: str, examples: list[dict], pad_id: int = 3) -> Path:
    with H5Writer(path, objective, 1000, "h", attrs={"pad_id": pad_id, "eos_id": 0}) as w:
        for ex in examples:
            w.append(ex)
        w.commit()
    return path


@pytest.fixture()
def sft_file(tmp_path) -> Path:
    examples, start = [], 0
    for n in SEGMENTS:
        ids = np.arange(start, start + n)
        examples.append({"sequence": ids, "loss_mask": (ids % 3 == 0).astype(np.uint8)})  # a mask we can predict
        start += n
    return _write(tmp_path / "sft.h5", "sft", examples)


@given(n=st.integers(0, 200), w=st.integers(1, 40), s=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_num_windows_matches_brute_force(n, w, s):
    assert num_windows(n, w, s) == sum(1 for start in range(0, n, s) if start + w + 1 <= n)


@pytest.mark.parametrize("window,stride", [(4, 3), (4, 4), (6, 1), (29, 5), (5, 7)])
def test_windows_cross_segment_boundaries(sft_file, window, stride):
    ds = SFTDataset(sft_file, window, stride, tokenizer_hash="h")
    flat = np.arange(30)
    assert len(ds) == (30 - window - 1) // stride + 1
    for i in range(len(ds)):
        s = i * stride
        item = ds[i]
        assert item["input_ids"].tolist() == flat[s:s + window].tolist()
        assert item["target_ids"].tolist() == flat[s + 1:s + window + 1].tolist()
        # the mask belongs to the targets: True exactly where the *target* token is a loss token
        # of an example that starts inside the window (one cut off from its start, i.e. from its
        # prompt, is not trained on in this window)
        assert item["loss_mask"].tolist() == [t % 3 == 0 and _example_start(t) >= s
                                              for t in item["target_ids"].tolist()]
        assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.bool
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_sft_windows_train_no_reply_cut_off_from_its_prompt(tmp_path):
    def example(ids: list[int], n_prompt: int) -> dict:
        return {"sequence": np.array(ids), "loss_mask": np.array([0] * n_prompt + [1] * (len(ids) - n_prompt), np.uint8)}

    # stream 1..10, replies 4 5 6 and 9 10; windows of 4 inputs start at 0, 2, 4
    ds = SFTDataset(_write(tmp_path / "sft.h5", "sft", [example([1, 2, 3, 4, 5, 6], 3), example([7, 8, 9, 10], 2)]),
                    window_size=4, stride=2)
    assert [ds[i]["target_ids"].tolist() for i in range(len(ds))] == [[2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert ds[0]["loss_mask"].tolist() == [False, False, True, True]  # the whole question is in view
    assert ds[1]["loss_mask"].tolist() == [False] * 4  # reply 4 5 6 without the question 1 2 3
    assert ds[2]["loss_mask"].tolist() == [False, False, False, True]  # 6 is cut off; 9 has its question 7 8


def test_window_edges_exactly_fill_or_fail(sft_file, tmp_path):
    seq = _write(tmp_path / "seq.h5", "seq", [{"sequence": np.arange(0, 3)}, {"sequence": np.arange(3, 5)}])
    one = SeqDataset(seq, window_size=4)
    assert len(one) == 1 and one[0]["target_ids"].tolist() == [1, 2, 3, 4]  # the last token is a target
    assert "loss_mask" not in one[0]
    with pytest.raises(ValueError, match="fewer than one window of window_size=5"):
        SeqDataset(seq, window_size=5)
    last = SFTDataset(sft_file, 8, 7)  # starts 0, 7, 14 (14 + 9 = 23 <= 30), 21 + 9 = 30: fits exactly
    assert len(last) == 4 and last[3]["target_ids"][-1].item() == 29


def test_sft_mixes_in_plain_text_windows(sft_file, tmp_path):
    # plain text: ids 500..899 in 4 documents; 99 windows of 4 inputs (stride = window_size)
    text = _write(tmp_path / "seq.h5", "seq", [{"sequence": np.arange(500 + 100 * d, 600 + 100 * d)} for d in range(4)])
    sft = SFTDataset(sft_file, 4, 2, tokenizer_hash="h")  # 13 windows of the 30-token SFT stream
    mix = TextMixDataset(sft, SeqDataset(text, 4, tokenizer_hash="h"), fraction=0.25)
    assert len(sft) == 13 and mix.n_text == 4 and len(mix) == 17  # 4 / 17 ~ 0.25
    items = [mix[i] for i in range(len(mix))]
    assert all(items[i]["loss_mask"].tolist() == sft[i]["loss_mask"].tolist() for i in range(13))
    text_items = items[13:]
    for item in text_items:  # plain text: targets are the input shifted by one, every one counts
        assert item["input_ids"].min() >= 500 and item["loss_mask"].all()
        assert item["target_ids"].tolist() == (item["input_ids"] + 1).tolist()
    # spread over the whole text file, not its first windows
    starts = [int(item["input_ids"][0]) for item in text_items]
    assert starts == sorted(starts) and starts[-1] - starts[0] > 250
    # a mixed batch collates like a plain SFT batch (the default stacking)
    batch = torch.utils.data.default_collate(items[11:15])
    assert batch["loss_mask"].shape == (4, 4) and batch["loss_mask"][2:].all()
    with pytest.raises(ValueError, match="must match the SFT windows"):
        TextMixDataset(sft, SeqDataset(text, 8), 0.25)


def test_datamodule_text_mixing_is_sft_only_and_checked(sft_file, tmp_path):
    text = _write(tmp_path / "seq.h5", "seq", [{"sequence": np.arange(500, 700)}])
    dm = AstraiDataModule({"train_path": str(sft_file), "val_path": str(sft_file), "objective": "sft",
                           "window_size": 4, "stride": 2, "batch_size": 2, "text_path": str(text),
                           "text_fraction": 0.5})
    dm.setup("fit")
    assert isinstance(dm.train_dataset, TextMixDataset) and len(dm.train_dataset) == 26
    assert isinstance(dm.val_dataset, SFTDataset)  # validation measures the replies alone
    # every text window comes through the loader (an SFT window here never has its whole mask on)
    assert sum(int(row.all()) for b in dm.train_dataloader() for row in b["loss_mask"]) == 13
    for bad, why in ((dict(text_fraction=0.2), "go together"), (dict(text_path=str(text)), "go together"),
                     (dict(text_path=str(text), text_fraction=1.0), r"\[0, 1\)"),
                     (dict(objective="seq", text_path=str(text), text_fraction=0.2), "sft")):
        with pytest.raises(ValueError, match=why):
            DataConfig.from_dict({"train_path": str(sft_file), "objective": "sft", **bad})


def test_dpo_collate_pads_and_masks(tmp_path):
    path = _write(tmp_path / "dpo.h5", "dpo", [
        {"prompt": [5, 6], "chosen": [5, 6, 7, 8], "chosen_mask": [0, 0, 1, 1],
         "rejected": [5, 6, 9], "rejected_mask": [0, 0, 1]},
        {"prompt": [5], "chosen": [5, 7], "chosen_mask": [0, 1],
         "rejected": [5, 9, 9, 9, 9], "rejected_mask": [0, 1, 1, 1, 1]},
    ], pad_id=3)
    ds = DPODataset(path)
    batch = collate_dpo([ds[0], ds[1]], pad_id=3)
    assert batch["chosen_ids"].tolist() == [[5, 6, 7, 8, 3], [5, 7, 3, 3, 3]]
    assert batch["rejected_ids"].tolist() == [[5, 6, 9, 3, 3], [5, 9, 9, 9, 9]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch["chosen_loss_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    assert batch["rejected_loss_mask"].int().tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert batch["prompt_lengths"].tolist() == [2, 1]
    assert DPODataset(path, max_length=3)[1]["rejected_ids"].tolist() == [5, 9, 9]


def test_grpo_collate_left_pads_prompts(tmp_path):
    answers = ["85", "Lady Macbeth"]
    path = _write(tmp_path / "g.h5", "grpo", [
        {"prompt": [1, 2, 3], "answer": np.frombuffer(answers[0].encode(), np.uint8)},
        {"prompt": [4], "answer": np.frombuffer(answers[1].encode(), np.uint8)}])
    batch = collate_grpo([GRPODataset(path)[i] for i in range(2)], pad_id=0)
    assert batch["prompt_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch["attention_mask"].int().tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompts"] == [[1, 2, 3], [4]] and batch["answers"] == answers
    assert batch["prompt_lengths"].tolist() == [3, 1]


def test_datamodule_batches_real_prepared_dpo(tmp_path, tokenizer_dir):
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer_dir)
    recs = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": "x" * (i % 4 + 1)} for i in range(10)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    prepare(PrepareConfig("dpo", str(tokenizer_dir), (str(src),), str(tmp_path / "d.h5"), workers=0, progress=False))
    dm = AstraiDataModule({"train_path": str(tmp_path / "d.h5"), "val_path": str(tmp_path / "d.h5"),
                           "objective": "dpo", "batch_size": 4, "tokenizer_hash": tok.hash})
    train = list(dm.train_dataloader())
    assert len(train) == 2  # 10 pairs, batches of 4, last partial batch dropped
    b = train[0]
    assert b["chosen_ids"].shape == b["rejected_ids"].shape == b["chosen_loss_mask"].shape
    assert (b["chosen_ids"][~b["chosen_attention_mask"]] == tok.pad_id).all()
    assert sum(len(v["chosen_ids"]) for v in dm.val_dataloader()) == 10  # validation keeps every pair
    with pytest.raises(ValueError, match="unknown data config key 'window'"):
        AstraiDataModule({"train_path": "x", "window": 3})
    with pytest.raises(ValueError, match="different tokenizer"):
        AstraiDataModule(DataConfig(str(tmp_path / "d.h5"), objective="dpo", tokenizer_hash="other")).setup("fit")


def test_shipped_recipes_data_sections_are_valid_data_configs():
    from astrai_train.objectives.config import load_recipe

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs" / "train").glob("*.yaml")):
        recipe = load_recipe(path)
        config = DataConfig.from_dict({"objective": recipe.objective, **recipe.data})
        if path.stem == "sft-tiny":  # the demo's SFT keeps pretraining text in the mix
            assert config.text_fraction > 0 and config.text_path.endswith("seq_train.h5")
