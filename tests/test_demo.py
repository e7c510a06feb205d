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
