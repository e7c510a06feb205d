"""`astrai eval` on a real tiny model directory: every metric is computed, and computed right."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from astrai_train.cli import main as cli
from astrai_train.data.tasks import TaskConfig, derive_tasks, speaker_prompt
from astrai_train.evaluate import EvalConfig, evaluate


pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("eval_tasks")
    derive_tasks(corpus_dir, out, TaskConfig(train_size=10, eval_size=40))
    return out


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    from astrai_train.model import Transformer
    from astrai_train.tokenizer import Tokenizer

    return Transformer.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), Tokenizer.from_pretrained(tiny_model_dir)


def test_cli_prints_every_metric_with_a_prior_computed_from_the_data(tiny_model_dir, tasks, tmp_path, capsys):
    from collections import Counter

    from astrai_train.tokenizer import Tokenizer

    out = tmp_path / "r.json"
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", str(tasks), "--limit", "6",
                "--ppl-tokens", "600", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    table = captured.out
    for label in ("perplexity", "speaker accuracy", "whole-line preference", "arithmetic accuracy", "prior"):
        assert label in table
    for bar in ("eval perplexity", "eval speaker", "eval arithmetic", "eval preference"):   # tqdm, on stderr
        assert bar in captured.err
    r = json.loads(out.read_text())
    assert r["speaker_accuracy"]["n"] == r["arithmetic_accuracy"]["n"] == r["whole_line_preference"]["n"] == 6
    # each prior is what a rule that reads only the held-out items scores on those very items
    held = [json.loads(line) for line in (tasks / "grpo_eval.jsonl").read_text().splitlines()]
    for task, metric in (("speaker", "speaker_accuracy"), ("arithmetic", "arithmetic_accuracy")):
        answers = [q["answer"] for q in held if q["task"] == task][:6]
        counts = Counter(answers)
        named = r[metric]["prior_rule"].removeprefix("always ").split(",")[0]
        assert r[metric]["prior"] == max(counts.values()) / 6 == counts[named] / 6
    assert r["speaker_accuracy"]["chance"] == 0.25 and r["arithmetic_accuracy"]["chance"] == 1 / 109
    # the rejected reply is the chosen line cut short: "always the shorter" never picks the whole line,
    # and a coin flip is no baseline for pairs that differ in length by construction
    assert r["whole_line_preference"]["prior"] == 0.0 and "chance" not in r["whole_line_preference"]
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode((tasks / "seq_eval.txt").read_text()[:600 * 16])[1:601]
    unigram = math.exp(-sum(c / 600 * math.log(c / 600) for c in Counter(ids).values()))
    assert r["perplexity"]["n"] == 600 and math.isclose(r["perplexity"]["prior"], unigram)
    # A random-init model is about as perplexed as a uniform guess over the vocabulary (worse than the unigram).
    assert 0.5 * r["perplexity"]["chance"] < r["perplexity"]["value"] < 2 * r["perplexity"]["chance"]
    assert r["perplexity"]["prior"] < r["perplexity"]["value"]
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "none")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_perplexity_equals_direct_cross_entropy(tiny_model_dir, tmp_path, model_and_tok):
    model, tok = model_and_tok
    text = "Who's there? Nay, answer me: stand, and unfold yourself. Long live the king! " * 8
    (tmp_path / "seq_eval.txt").write_text(text)
    r = evaluate(EvalConfig(model=str(tiny_model_dir), data=str(tmp_path), window=32))["perplexity"]
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():
        nll = [F.cross_entropy(model(ids[None, s:s + 32])[0], ids[s + 1:s + 33], reduction="sum").item()
               if s + 33 <= len(ids) else
               F.cross_entropy(model(ids[None, s:-1])[0], ids[s + 1:], reduction="sum").item()
               for s in range(0, len(ids) - 1, 32)]
    assert r["n"] == len(ids) - 1
    assert math.isclose(r["value"], math.exp(sum(nll) / (len(ids) - 1)), rel_tol=1e-4)


def test_accuracy_scores_what_the_model_actually_says(tiny_model_dir, tmp_path, model_and_tok):
    from astrai_train.model.generate import generate

    model, tok = model_and_tok
    prompts = [f"What is {a} + 1?" for a in range(4)]
    said = [tok.decode(o).strip() for o in generate(
        model, [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in prompts],
        12, eos_ids=tok.stop_ids)]
    recs = [{"prompt": [{"role": "user", "content": p}], "answer": s if i % 2 == 0 else s + "x", "task": "arithmetic"}
            for i, (p, s) in enumerate(zip(prompts, said))]
    (tmp_path / "grpo_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # chosen == rejected never wins (strictly higher log-prob is required); swapped pairs win half
    pair = lambda c, r: {"prompt": "What line follows: To be,", "chosen": c, "rejected": r}  # noqa: E731
    pairs = [pair("or not to be", "or not to be"), pair("a", "b"), pair("b", "a")]
    (tmp_path / "dpo_eval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    r = evaluate(EvalConfig(model=str(tiny_model_dir), data=str(tmp_path)))
    assert r["arithmetic_accuracy"]["value"] == 0.5 and r["arithmetic_accuracy"]["n"] == 4
    assert math.isclose(r["whole_line_preference"]["value"], 1 / 3)
    assert "perplexity" not in r and "speaker_accuracy" not in r


def test_speaker_chance_and_majority():
    from astrai_train.evaluate import majority, speaker_chance

    ask = lambda names: {"prompt": [{"role": "user", "content": speaker_prompt("X", names, "A line.")}]}  # noqa: E731
    assert speaker_chance([ask(["Macbeth", "Banquo"]), ask(["Macbeth", "Banquo", "Ross", "Lennox"])]) == \
        pytest.approx((1 / 2 + 1 / 4) / 2)
    assert majority(["B", "C", "B", "A"]) == (0.5, "B")
    assert majority(["C", "A", "A", "C"]) == (0.5, "A")  # a tie goes to the first in sort order
