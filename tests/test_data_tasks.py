"""Task derivation from the Shakespeare corpus: parsing, the held-out split, formats, determinism."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from astrai_train.cli import main as cli
from astrai_train.data.corpus import frequent_speakers, load_corpus, parse_turns
from astrai_train.data.tasks import (CHOICE_LABELS, EVAL_PLAYS, TaskConfig, cut_short, derive_tasks, speaker_choices,
                                     speaker_prompt)

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
        assert len(_read(tasks / f"{kind}_eval.jsonl")) == (120 if kind == "grpo" else 60)
    # GRPO trains on sums only; its eval file asks 60 of each kind of question
    assert {r["task"] for r in _read(tasks / "grpo_train.jsonl")} == {"arithmetic"}
    assert sorted(r["task"] for r in _read(tasks / "grpo_eval.jsonl")) == ["arithmetic"] * 60 + ["speaker"] * 60
    sft = _read(tasks / "sft_train.jsonl")
    assert {r["task"] for r in sft} == {"speaker", "next_line", "arithmetic"}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in sft)
    for r in _read(tasks / "grpo_train.jsonl") + _read(tasks / "grpo_eval.jsonl"):
        prompt = r["prompt"][0]["content"]
        if r["task"] == "arithmetic":
            a, b = prompt.removeprefix("What is ").removesuffix("?").split(" + ")
            assert r["answer"] == str(int(a) + int(b))
        else:
            assert len(speaker_choices(prompt)) == 4 and prompt.startswith("Who speaks the last line in ")
            assert r["answer"] in ("A", "B", "C", "D") and f"\n{r['answer']}. " in prompt
    for r in _read(tasks / "dpo_train.jsonl") + _read(tasks / "dpo_eval.jsonl"):
        assert r["prompt"][0]["content"].startswith("What line follows: ")
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        # rejected: the chosen line stopped short, after a whole word
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert rejected and chosen.startswith(rejected) and chosen[len(rejected)].isspace()


def test_speaker_questions_show_the_speeches_before_and_shuffle_the_options(tasks, corpus_dir):
    plays = {w.title: w for w in load_corpus(corpus_dir) if w.is_play}
    sft = [r for r in _read(tasks / "sft_train.jsonl") if r["task"] == "speaker"]
    grpo = [r for r in _read(tasks / "grpo_eval.jsonl") if r["task"] == "speaker"]
    for questions in ([(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft],
                      [(r["prompt"][0]["content"], r["answer"]) for r in grpo]):
        answers, orders = [], set()
        for prompt, answer in questions:
            rows = prompt.split("\n")
            play = plays[rows[0].removeprefix("Who speaks the last line in ").removesuffix("?")]
            (name1, said1), (name2, said2) = (row.split(": ", 1) for row in rows[1:3])
            line = rows[3].removeprefix("?: ")
            choices = speaker_choices(prompt)
            assert sorted(choices) == sorted(frequent_speakers(play.turns, 4))
            orders.add(tuple(choices))
            speaker = choices[CHOICE_LABELS.index(answer)]
            # the question is the first line of a speech; the two speeches before it, with their speakers
            i = next(i for i, t in enumerate(play.turns) if t.speaker == speaker and t.lines[0] == line
                     and (play.turns[i - 2].speaker, play.turns[i - 1].speaker) == (name1, name2))
            assert play.turns[i - 1].lines[-1].startswith(said2) and play.turns[i - 2].lines[-1].startswith(said1)
            answers.append(answer)
        # the options come in a random order, so no letter is right much more often than the others
        assert set(answers) == {"A", "B", "C", "D"} and len(orders) > 4
        assert max(answers.count(a) for a in "ABCD") < 0.45 * len(answers)
    assert speaker_prompt("X", ["P", "Q"], "A line.") == "Who speaks this line in X?\nA line.\nA. P\nB. Q"


def test_dpo_pairs_follow_the_prompt_line_and_cut_the_answer_short(tasks, corpus_dir):
    plays = [w for w in load_corpus(corpus_dir) if w.name in EVAL_PLAYS]
    follows = {(a, b) for w in plays for t in w.turns for a, b in zip(t.lines, t.lines[1:])}
    for r in _read(tasks / "dpo_eval.jsonl"):
        line = r["prompt"][0]["content"].removeprefix("What line follows: ")
        assert (line, r["chosen"][0]["content"]) in follows
        kept, words = len(r["rejected"][0]["content"].split()), len(r["chosen"][0]["content"].split())
        assert words / 2 <= kept < words
    rng = random.Random(0)
    cuts = {cut_short("Nay, answer me: stand, and unfold yourself.", rng) for _ in range(200)}
    # every cut after a word, keeping at least half of the 7 words and missing at least one
    assert cuts == {"Nay, answer me: stand,", "Nay, answer me: stand, and", "Nay, answer me: stand, and unfold"}
    assert {cut_short("a b c", rng) for _ in range(20)} == {"a b"}
    with pytest.raises(ValueError, match="fewer than three words"):
        cut_short("Who's there?", rng)
    assert speaker_choices("What line follows: A. line") == [] and speaker_choices("Q\nA. x\nC. y") == []


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
    with pytest.raises(ValueError, match="choices must be between 2 and 8"):
        TaskConfig(choices=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        derive_tasks(tmp_path / "nowhere", tmp_path)
