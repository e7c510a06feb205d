"""`make demo` cannot rot: its quick flavour runs every stage with the real commands (tokenizer,
tasks, prepare, SEQ/SFT/DPO/GRPO training, eval, pictures, serve + OpenAI + gRPC)."""
from __future__ import annotations

import json
import subprocess
import sys

from daemon_support import ROOT


def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "astrai_train.demo", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("tokenizer", "data", "init eval", "SEQ", "SFT", "DPO", "GRPO", "figures", "serve"):
        assert f"[demo] {stage}" in r.stdout, f"stage {stage!r} did not report"
    rows = json.loads((out / "metrics.json").read_text())
    assert list(rows) == ["init", "seq", "sft", "dpo", "grpo"]
    assert all(0 < rows[s]["perplexity"] for s in rows)
    # Training moves the model: even a handful of SEQ steps lowers held-out perplexity.
    assert rows["seq"]["perplexity"] < rows["init"]["perplexity"]
    # every row carries the data-only prior of each metric, computed from the held-out items
    held = [json.loads(line) for line in (out / "tasks" / "grpo_eval.jsonl").read_text().splitlines()]
    sums = [q["answer"] for q in held if q["task"] == "arithmetic"][:rows["init"]["arithmetic_accuracy_n"]]
    assert rows["init"]["arithmetic_accuracy_prior"] == max(map(sums.count, sums)) / len(sums)
    assert all(rows[s]["whole_line_preference_prior"] == 0.0 for s in rows)
    assert "(prior)" in (out / "metrics.txt").read_text() and "(chance)" not in (out / "metrics.txt").read_text()
    # SFT trained on plain text too: the recipe's mixing reached the data module
    hparams = (out / "sft-demo" / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "text_fraction: 0.15" in hparams and "seq_train.h5" in hparams
    timings = json.loads((out / "timings.json").read_text())
    assert {"SEQ", "SFT", "DPO", "GRPO", "serve", "total"} <= set(timings)
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "OpenAI client (streaming) asks" in r.stdout and "gRPC Generate stream asks" in r.stdout
    assert "astrai serve shut down cleanly (exit code 0)" in r.stdout


def test_table_marks_a_move_against_the_stronger_of_the_previous_model_and_the_prior():
    from astrai_train.demo import format_table, moved

    acc = lambda p, n=200, prior=0.025: {"arithmetic_accuracy": p, "arithmetic_accuracy_n": n,  # noqa: E731
                                         "arithmetic_accuracy_prior": prior}
    assert moved("arithmetic_accuracy", "higher", acc(0.155), acc(0.48)) == "✓"
    # 40% -> 45% on 200 sums is 1 standard error of the difference: within noise
    assert moved("arithmetic_accuracy", "higher", acc(0.40), acc(0.45)) == "~"
    assert moved("arithmetic_accuracy", "higher", acc(0.40), acc(0.45, n=2000)) == "✓"
    assert moved("arithmetic_accuracy", "higher", acc(0.30), acc(0.08)) == "✗"
    # a model that went from 0% to the score of always giving the most frequent answer learnt the
    # prior, not the task: measured against the prior, not the previous model, that is no move
    assert moved("arithmetic_accuracy", "higher", acc(0.0, prior=0.455), acc(0.455)) == "~"
    assert moved("arithmetic_accuracy", "higher", acc(0.0, prior=0.27), acc(0.45)) == "✓"
    assert moved("perplexity", "lower", {"perplexity": 2069.0}, {"perplexity": 91.1}) == "✓"
    assert moved("perplexity", "lower", {"perplexity": 2069.0, "perplexity_prior": 332.6},
                 {"perplexity": 500.0}) == "✗"  # better than the untrained model, worse than a unigram
    row = lambda ppl, sp, pref, ar: {  # noqa: E731
        "perplexity": ppl, "perplexity_prior": 332.6, "perplexity_n": 8192,
        "perplexity_prior_rule": "unigram of the held-out tokens",
        "speaker_accuracy": sp, "speaker_accuracy_prior": 0.27, "speaker_accuracy_n": 200,
        "speaker_accuracy_prior_rule": "always A, the most frequent answer",
        "whole_line_preference": pref, "whole_line_preference_prior": 0.0, "whole_line_preference_n": 200,
        "arithmetic_accuracy": ar, "arithmetic_accuracy_prior": 0.025, "arithmetic_accuracy_n": 200}
    table = format_table({"init": row(2069.0, 0.0, 0.0, 0.0), "seq": row(91.1, 0.0, 0.0, 0.0),
                          "sft": row(107.7, 0.24, 0.03, 0.69), "dpo": row(126.5, 0.205, 0.545, 0.265),
                          "grpo": row(119.8, 0.245, 0.535, 0.815)}).splitlines()
    assert table[2].split() == ["(prior)", "332.6", "27.0%", "0.0%", "2.5%"]
    assert table[3].split() == ["(held", "out)", "8,192", "tokens", "200", "questions", "200", "pairs", "200", "sums"]
    assert "91.1 ✓" in table[5] and "24.0% ~" in table[6] and "54.5% ✓" in table[7] and "81.5% ✓" in table[8]
    assert "always A, the most frequent answer" in table[9]
    # a stage that misses its metric is said in words, naming what it failed to beat
    assert table[-2] == ("SFT does not beat the prior (always A, the most frequent answer, 27.0%) on speaker id acc "
                         "by more than noise.")
    assert table[-1] == "SFT's held-out perplexity is 1.18x SEQ's."
