"""Exact mid-epoch resume: the sampler alone, then a real 2-process DDP Trainer (gloo on CPU).

Run as a script, this file is the training program the DDP test launches:
    python tests/test_data_resume.py DATA.h5 OUT_DIR MAX_STEPS
It trains a tiny module that records the windows it sees on each rank, checkpointing at step
MAX_STEPS // 2 (ModelCheckpoint), then resumes from that checkpoint in a fresh Trainer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from astrai_train.data.h5store import H5Writer
from astrai_train.data.repeat_sampler import RepeatSampler
from astrai_train.data.sampler import ResumableDistributedSampler

ROOT = Path(__file__).resolve().parents[1]
WINDOW, STRIDE, BATCH = 4, 4, 3


def write_counting_seq(path: Path, n_tokens: int) -> None:
    """A seq file whose token i is i, so a window's first input id names the window."""
    with H5Writer(path, "seq", vocab_size=60000, tokenizer_hash="test-hash", attrs={"pad_id": 0, "eos_id": 1}) as w:
        for start in range(0, n_tokens, 100):  # many segments: windows cross their boundaries
            w.append({"sequence": np.arange(start, min(start + 100, n_tokens))})
        w.commit()


# ---- the sampler on its own ---------------------------------------------------------------------

@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_cover_epoch_and_reshuffle(drop_last):
    n, replicas = 23, 2
    samplers = [ResumableDistributedSampler(n, replicas, r, shuffle=True, seed=5, drop_last=drop_last)
                for r in range(replicas)]
    epoch0 = [list(s) for s in samplers]
    assert all(len(e) == len(samplers[0]) == (11 if drop_last else 12) for e in epoch0)
    seen = set(epoch0[0]) | set(epoch0[1])
    assert seen == set(range(n)) or (drop_last and len(seen) == 22)
    assert not drop_last or not set(epoch0[0]) & set(epoch0[1])
    for s in samplers:
        s.set_epoch(1)
    assert [list(s) for s in samplers] != epoch0  # a new permutation per epoch
    assert list(samplers[1]) == samplers[1].epoch_order(1)[1::2]


def test_sampler_resume_yields_exactly_the_rest():
    full = ResumableDistributedSampler(50, 2, 1, shuffle=True, seed=3)
    full.set_epoch(2)
    expected = list(full)
    full.advance(9)
    state = full.state_dict()
    resumed = ResumableDistributedSampler(50, 2, 1, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # what Lightning does at the start of the resumed epoch: keeps the position
    assert list(resumed) == expected[9:]
    resumed.set_epoch(3)  # next epoch starts from the beginning
    assert len(list(resumed)) == len(resumed) == 25


def test_sampler_resume_with_another_world_size_skips_exactly_the_consumed_prefix():
    old = [ResumableDistributedSampler(40, 2, r, shuffle=True, seed=1) for r in range(2)]
    consumed = set()
    for s in old:
        consumed |= set(list(s)[:6])
        s.advance(6)
    new = [ResumableDistributedSampler(40, 4, r, shuffle=True, seed=1) for r in range(4)]
    rest = set()
    for s in new:
        s.load_state_dict(old[0].state_dict())
        rest |= set(s)
    assert rest == set(range(40)) - consumed


def test_sampler_rejects_other_data():
    s = ResumableDistributedSampler(10, 1, 0, seed=0)
    with pytest.raises(ValueError, match="dataset_len=12"):
        ResumableDistributedSampler(12, 1, 0, seed=0).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rank 2"):
        ResumableDistributedSampler(10, 2, 2)


def test_repeat_sampler_repeats_each_ranks_steps_and_resumes_mid_cycle():
    # 23 samples, 2 ranks -> 12 each; steps of 5 -> 2 whole steps per rank (the last 2 dropped), each twice.
    plain = [ResumableDistributedSampler(23, 2, r, shuffle=True, seed=4) for r in range(2)]
    repeat = [RepeatSampler(23, 2, r, shuffle=True, seed=4, step_size=5, repeats=2) for r in range(2)]
    for p, s in zip(plain, repeat):
        mine = list(p)
        assert list(s) == mine[0:5] * 2 + mine[5:10] * 2 and len(s) == 20
    s = repeat[1]
    stream = list(s)
    s.advance(7)                              # mid-way through the first step's second pass
    resumed = RepeatSampler(23, 2, 1, shuffle=True, seed=4, step_size=5, repeats=2)
    resumed.load_state_dict(s.state_dict())
    assert list(resumed) == stream[7:]
    # Another world size: the cycle the consumed prefix ends in starts again (no sample is lost).
    other = RepeatSampler(23, 1, 0, shuffle=True, seed=4, step_size=5, repeats=2)
    other.load_state_dict(s.state_dict())
    assert other.consumed == 0
    s.advance(3)                              # the first cycle done: 5 distinct samples on each rank
    other.load_state_dict(s.state_dict())
    assert other.consumed == 20               # two steps of 5 distinct samples, each twice
    with pytest.raises(ValueError, match="repeats=2, this run has repeats=1"):
        ResumableDistributedSampler(23, 2, 1, shuffle=True, seed=4).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="do not fill one optimizer step"):
        RepeatSampler(23, 2, 0, step_size=13, repeats=2)


# ---- the real thing: Lightning DDP on CPU, two processes -----------------------------------------

def _seen(out: Path, run: str) -> dict[int, dict[int, list[int]]]:
    """rank -> global step -> window ids of that step's batch."""
    return {r: {int(k): v for k, v in json.loads((out / f"{run}_rank{r}.json").read_text()).items()}
            for r in range(2)}


def test_ddp_resume_mid_epoch_sees_exactly_the_uninterrupted_batches(tmp_path):
    # 61 windows, 2 ranks, batch 3 -> 10 steps per epoch; 16 steps cross into epoch 2 and the
    # checkpoint at step 8 is mid-epoch. A DataLoader worker prefetches ahead of the loop.
    import torch

    data = tmp_path / "count.h5"
    write_counting_seq(data, 61 * STRIDE + 1)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(data), str(tmp_path), "16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    state = torch.load(tmp_path / "ckpt" / "step=8.ckpt", weights_only=False)["AstraiDataModule"]["train_sampler"]
    assert (state["epoch"], state["consumed_per_rank"], state["num_replicas"]) == (0, 8 * BATCH, 2)
    a, b = _seen(tmp_path, "straight"), _seen(tmp_path, "resumed")
    for rank in range(2):
        assert sorted(a[rank]) == list(range(16))
        assert sorted(b[rank]) == list(range(8, 16))  # the resumed run starts after the checkpoint
        for step in range(8, 16):
            assert b[rank][step] == a[rank][step], f"rank {rank} step {step}"
    # Within an epoch the two ranks never see the same window, and the next epoch reshuffles.
    epoch0 = [w for r in range(2) for s in range(10) for w in a[r][s]]
    assert len(epoch0) == len(set(epoch0)) == 60
    assert [a[0][s] for s in range(10, 16)] != [a[0][s] for s in range(6)]


def _main(data: str, out: str, max_steps: int) -> None:
    """Both runs in one launch (DDP start-up dominates the test's time): an uninterrupted run that
    checkpoints half way, then a fresh module, DataModule and Trainer resuming from that file."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from astrai_train.data import AstraiDataModule, DataConfig

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            self.seen[self.global_step] = [int(x) // STRIDE for x in ids[:, 0]]
            return (self.w * ids.float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    half = max_steps // 2
    for run, ckpt in (("straight", None), ("resumed", Path(out) / "ckpt" / f"step={half}.ckpt")):
        dm = AstraiDataModule(DataConfig(train_path=data, objective="seq", window_size=WINDOW, stride=STRIDE,
                                         batch_size=BATCH, num_workers=1, seed=7, tokenizer_hash="test-hash"))
        model = Recorder()
        saver = ModelCheckpoint(dirpath=Path(out) / "ckpt", filename="{step}",
                                every_n_train_steps=half, save_top_k=-1, monitor=None)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=max_steps,
                            callbacks=[saver] if ckpt is None else [], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=ckpt is None, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        (Path(out) / f"{run}_rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
