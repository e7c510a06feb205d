"""Task derivation from the Shakespeare corpus: parsing, the held-out split, formats, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from astrai_train.cli import main as cli
from astrai_train.data.corpus import frequent_speakers, load_corpus, parse_turns
from astrai_train.data.tasks import EVAL_PLAYS, TaskConfig, derive_tasks

PLAY = """HAMLET

PERSONS REPRESENTED.

Bernardo, Officer.
Francisco, a Soldier

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Aside.] Stand, ho!

Ber.
He.

FIRST CLOWN.
Is she to be buried in Christian burial [Digging. Sings.
And more]  that wilfully seeks her own salvation?

THESEUS
   What say you, Hermia?
"""


def test_parse_turns_handles_heading_styles_and_directions():
    turns = parse_turns(PLAY)
    assert [(t.speaker, t.lines) for t in turns] == [
        ("Bernardo", ("Who's there?",)),  # "Ber." expanded from the cast list
        ("Francisco", ("Nay, answer me: stand, and unfold yourself.", "Stand, ho!")),
        ("Bernardo", ("He.",)),  # a one-word speech that looks like a heading is still a speech
        ("First Clown", ("Is she to be buried in Christian burial", "that wilfully seeks her own salvation?")),
        ("Theseus", ("What say you, Hermia?",)),
    ]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, corpus_dir) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    derive_tasks(corpus_dir, out, TaskConfig(train_size=300, eval_size=60))
    return out


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_plays_have_speakers_and_poems_do_not(corpus_dir):
    works = {w.name: w for w in load_corpus(corpus_dir)}
    assert not works["sonnets_gut"].is_play and works["hamlet_gut"].is_play
    assert works["macbeth_gut"].title == "Macbeth"
    assert set(frequent_speakers(works["macbeth_gut"].turns, 3)) == {"Macbeth", "Lady Macbeth", "Macduff"}
    assert sum(w.is_play for w in works.values()) >= 35 and all(len(w.turns) >= 300 for w in works.values() if w.is_play)


def test_task_files_have_trl_formats_and_correct_answers(tasks):
    counts = json.loads((tasks / "manifest.json").read_text())["counts"]
    for kind in ("sft", "dpo", "grpo"):
        assert len(_read(tasks / f"{kind}_train.jsonl")) == counts[f"{kind}_train.jsonl"] == 300
        assert len(_read(tasks / f"{kind}_eval.jsonl")) == 60
    sft = _read(tasks / "sft_train.jsonl")
    assert {r["task"] for r in sft} == {"speaker", "next_line", "arithmetic"}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    for r in _read(tasks / "grpo_train.jsonl") + _read(tasks / "grpo_eval.jsonl"):
        prompt = r["prompt"][0]["content"]
        if r["task"] == "arithmetic":
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert r["answer"] == str(int(a) + int(b))
        else:
            choices = prompt.split("Choose from: ")[1].split(".\n")[0].split(", ")
            assert r["answer"] in choices and len(choices) == 4 and prompt.startswith("Who speaks this line in ")
    for r in _read(tasks / "dpo_eval.jsonl"):
        assert r["prompt"][0]["content"].startswith("What line follows: ")
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["chosen"][0]["content"] != r["rejected"][0]["content"]


def test_eval_choices_are_the_plays_speakers_and_train_mixes_in_renamed_ones(tasks, corpus_dir):
    plays = {w.title: frequent_speakers(w.turns, 4) for w in load_corpus(corpus_dir) if w.is_play}

    def split(r):
        prompt = r["prompt"][0]["content"]
        title = prompt.removeprefix("Who speaks this line in ").split("? Choose from: ")[0]
        return title, prompt.split("Choose from: ")[1].split(".\n")[0].split(", ")

    evals = [split(r) for r in _read(tasks / "grpo_eval.jsonl") if r["task"] == "speaker"]
    assert evals and all(choices == plays[title] for title, choices in evals)  # most frequent first
    train = [split(r) for r in _read(tasks / "grpo_train.jsonl") if r["task"] == "speaker"]
    renamed = sum(choices != plays[title] for title, choices in train)
    assert 0.3 < renamed / len(train) < 0.7  # renamed_pct=50


def test_held_out_plays_never_reach_training(tasks, corpus_dir):
    works = {w.name: w for w in load_corpus(corpus_dir)}
    train_text = (tasks / "seq_train.txt").read_text()
    eval_text = (tasks / "seq_eval.txt").read_text()
    titles = [works[p].title for p in EVAL_PLAYS]
    assert works["hamlet_gut"].text.strip()[:2000] in train_text
    for name in EVAL_PLAYS:
        opening = works[name].text.strip()[:2000]
        assert opening in eval_text and opening not in train_text
    for kind in ("sft", "grpo"):
        train = json.dumps(_read(tasks / f"{kind}_train.jsonl"))
        assert not any(f"in {t}?" in train for t in titles)
        assert any(f"in {t}?" in json.dumps(_read(tasks / f"{kind}_eval.jsonl")) for t in titles)
    sums = lambda f: {r["prompt"][0]["content"] for r in _read(f) if r["task"] == "arithmetic"}  # noqa: E731
    assert sums(tasks / "grpo_eval.jsonl") and not sums(tasks / "grpo_eval.jsonl") & sums(tasks / "grpo_train.jsonl")


def test_cli_is_deterministic(tasks, corpus_dir, tmp_path, capsys):
    assert cli(["tasks", "--corpus", str(corpus_dir), "--out", str(tmp_path), "--train-size", "300",
                "--eval-size", "60"]) == 0
    assert "grpo_eval.jsonl" in capsys.readouterr().out
    for name in ("sft_train.jsonl", "dpo_eval.jsonl", "grpo_train.jsonl", "seq_eval.txt"):
        assert (tmp_path / name).read_bytes() == (tasks / name).read_bytes()
    with pytest.raises(ValueError, match="choices must be at least 2"):
        TaskConfig(choices=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        derive_tasks(tmp_path / "nowhere", tmp_path)
