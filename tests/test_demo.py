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
    for png in ("loss_curves.png", "metrics.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "OpenAI client (streaming) asks" in r.stdout and "gRPC Generate stream asks" in r.stdout
    assert "astrai serve shut down cleanly (exit code 0)" in r.stdout


def test_table_marks_a_move_only_beyond_noise():
    from astrai_train.demo import format_table, moved

    acc = lambda p, n=200: {"arithmetic_accuracy": p, "arithmetic_accuracy_n": n}  # noqa: E731
    assert moved("arithmetic_accuracy", "higher", acc(0.155), acc(0.48)) == "✓"
    # 40% -> 45% on 200 sums is 1 standard error of the difference: within noise
    assert moved("arithmetic_accuracy", "higher", acc(0.40), acc(0.45)) == "~"
    assert moved("arithmetic_accuracy", "higher", acc(0.40), acc(0.45, n=2000)) == "✓"
    assert moved("arithmetic_accuracy", "higher", acc(0.08), acc(0.04)) == "✗"
    assert moved("perplexity", "lower", {"perplexity": 2069.0}, {"perplexity": 91.1}) == "✓"
    row = lambda ppl, sp, pref, ar: {  # noqa: E731
        "perplexity": ppl, "perplexity_chance": 2048.0, "perplexity_n": 8192,
        "speaker_accuracy": sp, "speaker_accuracy_chance": 0.25, "speaker_accuracy_n": 200,
        "whole_line_preference": pref, "whole_line_preference_chance": 0.5, "whole_line_preference_n": 200,
        "arithmetic_accuracy": ar, "arithmetic_accuracy_chance": 1 / 109, "arithmetic_accuracy_n": 200}
    table = format_table({"init": row(2069.0, 0.0, 0.0, 0.0), "seq": row(91.1, 0.0, 0.0, 0.0),
                          "sft": row(1083.0, 0.455, 0.025, 0.405), "dpo": row(714.6, 0.455, 0.32, 0.155),
                          "grpo": row(761.7, 0.455, 0.325, 0.43)}).splitlines()
    assert table[3].split() == ["(held", "out)", "8,192", "tokens", "200", "questions", "200", "pairs", "200", "sums"]
    assert "91.1 ✓" in table[5] and "45.5% ✓" in table[6] and "32.0% ✓" in table[7] and "43.0% ✓" in table[8]
