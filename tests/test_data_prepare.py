"""`astrai prepare`: every objective round-trips through HDF5 exactly as the tokenizer encodes it,
masks sit where the chat template puts assistant tokens, and bad input fails cleanly."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from astrai_train.cli import main as cli
from astrai_train.data.h5store import H5Writer, TokenStore
from astrai_train.data.prepare import PrepareConfig, prepare
from astrai_train.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tokenizer_dir)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _prep(tokenizer_dir, objective, inputs, out, **kw):
    return prepare(PrepareConfig(objective=objective, tokenizer=str(tokenizer_dir), inputs=tuple(map(str, inputs)),
                                 out=str(out), workers=kw.pop("workers", 0), progress=False, **kw))


def _no_leftovers(directory: Path) -> None:
    assert not [p.name for p in directory.iterdir() if ".tmp-" in p.name]


SFT = [
    {"messages": [{"role": "user", "content": "Who's there?"},
                  {"role": "assistant", "content": "Nay, answer me: stand, and unfold yourself."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 37 + 48?"},
                  {"role": "assistant", "content": "85"},
                  {"role": "user", "content": "And 1 + 1?"},
                  {"role": "assistant", "content": "2"}], "task": "extra keys are ignored"},
]


def test_seq_round_trip_across_chunks_and_gzip(tmp_path, tok, tokenizer_dir, corpus_dir):
    plain = tmp_path / "a.txt"
    plain.write_text("To be, or not to be, that is the question.\n\nWhether 'tis nobler\n  in the mind\n")
    # Small chunks force many cuts inside the play: the tokens must not change at any of them.
    stats = _prep(tokenizer_dir, "seq", [plain, corpus_dir / "hamlet_gut.txt.gz"], tmp_path / "seq.h5",
                  chunk_chars=4096, batch_chars=10000)
    store = TokenStore(tmp_path / "seq.h5", "seq", tok.hash)
    assert store.n_segments == 2 and stats.n_examples == 2
    assert store.segment("sequence", 0).tolist() == tok.encode(plain.read_text()) + [tok.eos_id]
    full = gzip.open(corpus_dir / "hamlet_gut.txt.gz", "rt").read()
    got = store.segment("sequence", 1).tolist()
    assert len(full) > 20 * 4096 and got == tok.encode(full) + [tok.eos_id]
    with h5py.File(tmp_path / "seq.h5") as f:
        assert f["sequence"].dtype == np.uint16 and f["sequence"].compression == "gzip"
        assert f["sequence"].chunks is not None and f["sequence"].maxshape == (None,)
        assert f.attrs["tokenizer_hash"] == tok.hash and f.attrs["objective"] == "seq"
        assert f.attrs["n_examples"] == 2 and f.attrs["n_tokens_sequence"] == stats.n_tokens == f["sequence"].shape[0]
        assert f.attrs["format_version"] == 1 and f.attrs["pad_id"] == tok.pad_id
    _no_leftovers(tmp_path)


def test_sft_round_trip_and_loss_mask_follows_the_chat_template(tmp_path, tok, tokenizer_dir):
    _prep(tokenizer_dir, "sft", [_jsonl(tmp_path / "sft.jsonl", SFT)], tmp_path / "sft.h5")
    store = TokenStore(tmp_path / "sft.h5", "sft", tok.hash)
    assert store.n_segments == 2
    end = tok.end_of_turn_id
    for i, rec in enumerate(SFT):
        ids, mask = store.segment("sequence", i).tolist(), store.segment("loss_mask", i).tolist()
        assert ids == tok.apply_chat_template(rec["messages"]) and (ids, mask) == tuple(tok.encode_chat(rec["messages"]))
        # The masked tokens are exactly each assistant reply followed by its end-of-turn token.
        replies = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        runs, cur = [], []
        for t, m in zip(ids, mask):
            if m:
                cur.append(t)
            elif cur:
                runs.append(cur)
                cur = []
        assert [r[-1] for r in runs] == [end] * len(replies)
        assert [tok.decode(r[:-1]) for r in runs] == replies
        user_text = tok.decode([t for t, m in zip(ids, mask) if not m])
        assert all(m["content"] in user_text for m in rec["messages"] if m["role"] != "assistant")


def test_dpo_round_trip_masks_only_the_completion(tmp_path, tok, tokenizer_dir):
    recs = [
        {"prompt": "What line follows: Who's there?", "chosen": "Nay, answer me.", "rejected": "Long live the king!"},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Next line?"}],
         "chosen": [{"role": "assistant", "content": "He."}], "rejected": [{"role": "assistant", "content": "Say."}]},
    ]
    _prep(tokenizer_dir, "dpo", [_jsonl(tmp_path / "dpo.jsonl", recs)], tmp_path / "dpo.h5")
    store = TokenStore(tmp_path / "dpo.h5", "dpo", tok.hash)
    for i, rec in enumerate(recs):
        prompt = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
        p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True)
        assert store.segment("prompt", i).tolist() == p_ids
        for side in ("chosen", "rejected"):
            comp = rec[side] if isinstance(rec[side], list) else [{"role": "assistant", "content": rec[side]}]
            ids = store.segment(side, i).tolist()
            mask = store.segment(f"{side}_mask", i).tolist()
            assert ids == tok.apply_chat_template(prompt + comp)
            assert ids[: len(p_ids)] == p_ids and not any(mask[: len(p_ids)])  # "Hello" is context, not loss
            masked = [t for t, m in zip(ids, mask) if m]
            assert masked[-1] == tok.end_of_turn_id and tok.decode(masked[:-1]) == comp[0]["content"]


def test_grpo_round_trip_keeps_the_answer_string(tmp_path, tok, tokenizer_dir):
    recs = [{"prompt": [{"role": "user", "content": "What is 37 + 48?"}], "answer": "85"},
            {"messages": [{"role": "user", "content": "Who speaks?"}], "answer": 7},
            {"prompt": "春眠不觉晓", "answer": "处处闻啼鸟"}]
    _prep(tokenizer_dir, "grpo", [_jsonl(tmp_path / "g.jsonl", recs)], tmp_path / "g.h5", compression="lzf")
    store = TokenStore(tmp_path / "g.h5", "grpo", tok.hash)
    for i, rec in enumerate(recs):
        msgs = rec.get("prompt", rec.get("messages"))
        msgs = msgs if isinstance(msgs, list) else [{"role": "user", "content": msgs}]
        assert store.segment("prompt", i).tolist() == tok.apply_chat_template(msgs, add_generation_prompt=True)
        assert store.segment("answer", i).tobytes().decode() == str(rec["answer"])


def test_workers_write_the_same_file_as_inline(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "sft.jsonl", SFT * 40)
    _prep(tokenizer_dir, "sft", [path], tmp_path / "inline.h5")
    proc = subprocess.run([sys.executable, "-m", "astrai_train.cli", "prepare", "sft", "--tokenizer", str(tokenizer_dir),
                           "--input", str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "pool.h5"), "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "80 examples" in proc.stdout and "tokens/s" in proc.stdout
    with h5py.File(tmp_path / "inline.h5") as a, h5py.File(tmp_path / "pool.h5") as b:
        for key in ("sequence", "sequence_offsets", "loss_mask", "loss_mask_offsets"):
            assert np.array_equal(a[key][:], b[key][:])


BAD = [SFT[0], "{not json", SFT[1], {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}, SFT[0]]


def test_bad_line_stops_with_file_and_line_and_leaves_nothing(tmp_path, tokenizer_dir):
    path = _jsonl(tmp_path / "bad.jsonl", BAD)
    out = tmp_path / "out.h5"
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: malformed JSON"):
        _prep(tokenizer_dir, "sft", [path], out)
    assert not out.exists()
    _no_leftovers(tmp_path)
    _jsonl(path, [SFT[0], BAD[3]])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: messages\[1\] has role 'bot'"):
        _prep(tokenizer_dir, "sft", [path], out)
    _no_leftovers(tmp_path)


def test_skip_invalid_counts_and_cli_reports_file_line(tmp_path, tokenizer_dir, capsys):
    path = _jsonl(tmp_path / "bad.jsonl", BAD)
    out = tmp_path / "out.h5"
    assert cli(["prepare", "sft", "--tokenizer", str(tokenizer_dir), "--input", str(path), "--out", str(out),
                "--workers", "0", "--no-progress"]) == 1
    assert f"{path}:2: malformed JSON" in capsys.readouterr().err and not out.exists()
    assert cli(["prepare", "sft", "--tokenizer", str(tokenizer_dir), "--input", str(path), "--out", str(out),
                "--workers", "0", "--no-progress", "--skip-invalid"]) == 0
    assert "skipped 2 invalid records" in capsys.readouterr().out
    store = TokenStore(out, "sft")
    assert store.n_segments == 3 and store.attrs["n_skipped"] == 2
    assert cli(["prepare", "dpo", "--tokenizer", str(tokenizer_dir), "--input", str(tmp_path / "nope*.jsonl"),
                "--out", str(out), "--workers", "0"]) == 1
    assert "'" + str(tmp_path / "nope*.jsonl") + "' matches no file" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_writer_leaves_no_file(tmp_path, exc):
    out = tmp_path / "x.h5"
    with pytest.raises(exc):
        with H5Writer(out, "seq", 1000, "h") as w:
            w.append({"sequence": np.arange(10)})
            assert w.tmp_path.exists()
            raise exc()
    assert not out.exists()
    _no_leftovers(tmp_path)


def test_other_tokenizer_or_objective_fails_clearly(tmp_path, tok, tokenizer_dir):
    from astrai_train.data import DPODataset, SeqDataset

    _prep(tokenizer_dir, "sft", [_jsonl(tmp_path / "s.jsonl", SFT)], tmp_path / "sft.h5")
    with pytest.raises(ValueError, match=rf"different tokenizer \(hash {tok.hash}\).*\(hash deadbeef\)"):
        TokenStore(tmp_path / "sft.h5", "sft", tokenizer_hash="deadbeef")
    with pytest.raises(ValueError, match="holds 'sft' data, but the 'dpo' objective"):
        DPODataset(tmp_path / "sft.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        SeqDataset(tmp_path / "missing.h5", 8)


def test_ctrl_c_that_library_code_swallows_is_still_honoured(tmp_path, tokenizer_dir, monkeypatch, capsys):
    """A Ctrl-C whose KeyboardInterrupt is raised, and dropped, inside code that is not ours (a
    __del__, a callback): prepare runs to the end, yet the command still reports the interrupt,
    exits 130 and leaves no file."""
    import os
    import signal

    from astrai_train.data import prepare as prepare_module

    real = prepare_module.prepare

    def swallowing(cfg):
        try:
            os.kill(os.getpid(), signal.SIGINT)     # delivered to the main thread right here
        except KeyboardInterrupt:
            pass                                    # ... and dropped, as a __del__ would
        return real(cfg)

    monkeypatch.setattr(prepare_module, "prepare", swallowing)
    path = _jsonl(tmp_path / "s.jsonl", SFT)
    out = tmp_path / "out.h5"
    assert cli(["prepare", "sft", "--tokenizer", str(tokenizer_dir), "--input", str(path), "--out", str(out),
                "--workers", "0", "--no-progress"]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # put back


def test_ctrl_c_mid_run_removes_the_temporary_file(tmp_path, tokenizer_dir, corpus_dir):
    import signal
    import time

    big = tmp_path / "big.txt"
    big.write_text(gzip.open(corpus_dir / "hamlet_gut.txt.gz", "rt").read() * 60)  # ~10 MB: runs for a while
    out = tmp_path / "big.h5"
    proc = subprocess.Popen([sys.executable, "-m", "astrai_train.cli", "prepare", "seq", "--tokenizer", str(tokenizer_dir),
                             "--input", str(big), "--out", str(out), "--workers", "1", "--no-progress"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(".tmp-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert not out.exists()
    _no_leftovers(tmp_path)
