"""Real task data from the Shakespeare corpus, in the JSONL formats TRL uses.

A fixed split holds out whole plays (EVAL_PLAYS) so evaluation never sees a line the model was
trained on, and a fixed share of the sums so it never sees a sum it was trained on. Every file is
derived deterministically from the corpus and the seed.

    seq_{train,eval}.txt     the text itself (poems included in train)
    sft_{train,eval}.jsonl   {"messages": [user, assistant], "task"}: speaker / next line / arithmetic
    dpo_{train,eval}.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task"}:
                             the line that follows, over the same line cut short
    grpo_{train,eval}.jsonl  {"prompt": [user], "answer": str, "task"}: arithmetic (eval: and speaker)

The tasks are shaped to be learnable by a tiny model in CPU minutes: speaker questions show the
speeches before the line (who said what) and offer the play's most frequent speakers as lettered
options in a random order, answered with the letter; sums add a digit to a number; only short
lines are used. "task" is an extra column that TRL ignores and `astrai eval` groups by.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from .corpus import Work, frequent_speakers, load_corpus

# Whole plays held out for evaluation: two tragedies, two comedies, all with plenty of turns.
EVAL_PLAYS = ("julius_caesar_gut", "macbeth_gut", "tempest_gut", "twelfth_night_gut")

# Mixtures (fractions of each file's examples); the remainder of SFT is next-line questions.
# Sums get most of it: the CPU demo's 400 SFT steps show some 17,000 of them, about what a tiny
# model needs before it reads the digits (with a fifth of the mix speaker questions, it had not).
SFT_SPEAKER_SHARE = 0.1
SFT_ARITHMETIC_SHARE = 0.8
# Option labels of a speaker question; the answer is one of them.
CHOICE_LABELS = "ABCDEFGH"


@dataclass(frozen=True)
class TaskConfig:
    """How many examples of what shape `derive_tasks` writes."""

    train_size: int = 4000      # examples in each *_train.jsonl
    eval_size: int = 400        # examples per *_eval.jsonl (grpo_eval: of each kind); fewer if the held-out ones run out
    choices: int = 4            # speakers offered per speaker question: the play's most frequent ones
    speaker_context: int = 2    # speeches shown before a speaker question's line, as "Name: its last line" (0: the line alone)
    min_line_chars: int = 12    # shorter lines carry too little to guess from
    max_line_chars: int = 60    # longer lines are skipped: short targets are learnable by tiny models
    max_operand: int = 99       # a sum's first number is in [0, max_operand]
    max_addend: int = 9         # and its second in [0, max_addend]: number + digit is learnt as a method
    seed: int = 0               # every random choice derives from this

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TaskConfig.{f.name} must be a non-negative integer, got {value!r}")
        if not 2 <= self.choices <= len(CHOICE_LABELS):
            raise ValueError(f"TaskConfig.choices must be between 2 and {len(CHOICE_LABELS)}, got {self.choices}")
        if self.min_line_chars > self.max_line_chars:
            raise ValueError(f"TaskConfig.min_line_chars ({self.min_line_chars}) exceeds "
                             f"max_line_chars ({self.max_line_chars})")


def speaker_prompt(title: str, choices: list[str], line: str, context: list[tuple[str, str]] = ()) -> str:
    """Multiple choice with lettered options, answered with the letter. Answering with the name
    would ask a 4M-parameter model to copy, token by token, a name it has never seen (the held-out
    plays' casts) out of the prompt. `context`: (speaker, line) of the speeches before the line."""
    options = "\n".join(f"{label}. {name}" for label, name in zip(CHOICE_LABELS, choices))
    if not context:
        return f"Who speaks this line in {title}?\n{line}\n{options}"
    before = "\n".join(f"{name}: {said}" for name, said in context)
    return f"Who speaks the last line in {title}?\n{before}\n?: {line}\n{options}"


def speaker_choices(prompt: str) -> list[str]:
    """The names a speaker prompt offers, in order: its last rows, labelled A, B, ... ([] when
    the prompt does not end in such options)."""
    rows = prompt.split("\n")
    for start in range(len(rows) - 1, -1, -1):
        if rows[start].startswith(f"{CHOICE_LABELS[0]}. "):
            options = rows[start:]
            if len(options) <= len(CHOICE_LABELS) and all(
                    row.startswith(f"{label}. ") for label, row in zip(CHOICE_LABELS, options)):
                return [row[3:] for row in options]
            break
    return []


def next_line_prompt(line: str) -> str:
    return f"What line follows: {line}"


def arithmetic_prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def cut_short(line: str, rng: random.Random) -> str:
    """`line` stopped after a random number of its words: at least half of them kept and at
    least one missing (a cut near the start would leave a reply so short that no model could be
    taught to prefer the whole line's many more tokens), cut at a space of the line itself (so
    the kept words are the line's own tokens)."""
    line = line.strip()
    spaces = [m.start() for m in re.finditer(r"\s+", line)]  # spaces[i]: after word i + 1
    if len(spaces) < 2:
        raise ValueError(f"a line of fewer than three words has no cut that leaves a line: {line!r}")
    n_words = len(spaces) + 1
    return line[:rng.choice(spaces[(n_words + 1) // 2 - 1:])]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _take(items: list, n: int, rng: random.Random, repeat: bool) -> list:
    """n items in a seeded random order; cycles through reshuffles when repeat and n > len(items)."""
    if not items:
        return []
    out: list = []
    while len(out) < n:
        batch = items[:]
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
        if not repeat:
            break
    return out


def _shorten(line: str, limit: int) -> str:
    """line cut at the last space that keeps it within limit characters (whole when it fits)."""
    if len(line) <= limit:
        return line
    cut = line.rfind(" ", 0, limit)
    return line[:cut if cut > 0 else limit]


SpeakerItem = tuple[str, tuple[str, ...], str, str, tuple[tuple[str, str], ...]]  # title, choices, line, speaker, context


class _Pool:
    """Candidate questions of one split (train or eval plays)."""

    def __init__(self, plays: list[Work], cfg: TaskConfig, rng: random.Random) -> None:
        ok = lambda s: cfg.min_line_chars <= len(s) <= cfg.max_line_chars  # noqa: E731
        self.speaker: list[SpeakerItem] = []
        self.next_line: list[tuple[str, str, str]] = []  # (line, next line, play)
        k = cfg.speaker_context
        for play in plays:
            # The play's most frequent speakers, in a random order per question: in a fixed order
            # (most frequent first) a model learns "answer A", which scores the lead's share of
            # the lines without reading them.
            top = frequent_speakers(play.turns, cfg.choices)
            for i, turn in enumerate(play.turns):
                # One question per speech, on its first line: the lines of one speech share an
                # answer, and held-out questions that share answers count as fewer than they are.
                if turn.speaker in top and i >= k and ok(turn.lines[0]):
                    context = tuple((t.speaker, _shorten(t.lines[-1], cfg.max_line_chars)) for t in play.turns[i - k:i])
                    self.speaker.append((play.title, tuple(rng.sample(top, len(top))), turn.lines[0], turn.speaker,
                                         context))
                for a, b in zip(turn.lines, turn.lines[1:]):
                    if ok(a) and ok(b) and a != b:
                        self.next_line.append((a, b, play.name))


def _speaker_qa(item: SpeakerItem) -> tuple[str, str]:
    """(prompt, answer) of a speaker question: the answer is the speaker's letter."""
    title, choices, line, speaker, context = item
    return speaker_prompt(title, list(choices), line, list(context)), CHOICE_LABELS[choices.index(speaker)]


def _arithmetic_split(cfg: TaskConfig, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(train sums, held-out sums). A number plus a digit is learnt as a method (copy the tens,
    add the units, carry) that a tiny model applies to held-out sums as well as to trained ones.
    Two digits (0-9 + 0-9) make only 100 sums, too few to learn a method from: a tiny model gets a
    held-out one right only as the mirror of a trained one (3 + 4 from 4 + 3)."""
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_addend + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = min(n_eval, len(pairs) // 2)
    return pairs[n_eval:], pairs[:n_eval]


def _arith(pairs: list[tuple[int, int]]) -> list[tuple[str, str]]:
    return [(arithmetic_prompt(a, b), str(a + b)) for a, b in pairs]


def _split_records(pool: _Pool, arith: list[tuple[str, str]], n: int, rng: random.Random,
                   train: bool) -> dict[str, list[dict[str, Any]]]:
    repeat = train  # the training split cycles through its questions; the eval split uses each once
    n_sp, n_ar = int(n * SFT_SPEAKER_SHARE), int(n * SFT_ARITHMETIC_SHARE)
    sft = [{"messages": _user(p) + _assistant(a), "task": "speaker"}
           for p, a in (_speaker_qa(it) for it in _take(pool.speaker, n_sp, rng, repeat))]
    sft += [{"messages": _user(next_line_prompt(x)) + _assistant(y), "task": "next_line"}
            for x, y, _ in _take(pool.next_line, n - n_sp - n_ar, rng, repeat)]
    sft += [{"messages": _user(p) + _assistant(a), "task": "arithmetic"} for p, a in _take(arith, n_ar, rng, repeat)]
    rng.shuffle(sft)

    # DPO: the rejected reply is the very line that follows, stopped short. A pretrained model
    # prefers it (fewer tokens, fewer nats); what DPO has to teach is that a reply ends where the
    # line does, which is a property of lines, so it carries over to the held-out plays.
    cuttable = [(x, y) for x, y, _ in pool.next_line if len(y.split()) >= 3]
    dpo = [{"prompt": _user(next_line_prompt(x)), "chosen": _assistant(y), "rejected": _assistant(cut_short(y, rng)),
            "task": "next_line"} for x, y in _take(cuttable, n, rng, repeat)]

    # GRPO trains on sums only, the metric it is for (rewarding sampled speaker letters mostly
    # rewards the prior, "A", that SFT already taught). The eval file holds both kinds of
    # question, n of each, for `astrai eval`.
    grpo = [{"prompt": _user(p), "answer": a, "task": "arithmetic"} for p, a in _take(arith, n, rng, repeat)]
    if not train:
        grpo += [{"prompt": _user(p), "answer": a, "task": "speaker"}
                 for p, a in (_speaker_qa(it) for it in _take(pool.speaker, n, rng, repeat))]
    rng.shuffle(grpo)
    return {"sft": sft, "dpo": dpo, "grpo": grpo}


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def derive_tasks(corpus_dir: str | Path, out_dir: str | Path, cfg: TaskConfig = TaskConfig()) -> dict[str, int]:
    """Write every task file into out_dir; returns {file name: number of examples (or characters for .txt)}."""
    works = load_corpus(corpus_dir)
    names = {w.name for w in works}
    missing = [p for p in EVAL_PLAYS if p not in names]
    if missing:
        raise FileNotFoundError(f"held-out plays {missing} not found in corpus {str(corpus_dir)!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_works = [w for w in works if w.name not in EVAL_PLAYS]
    eval_works = [w for w in works if w.name in EVAL_PLAYS]

    counts: dict[str, int] = {}
    for split, group in (("train", train_works), ("eval", eval_works)):
        text = "\n\n".join(w.text.strip() for w in group) + "\n"
        (out / f"seq_{split}.txt").write_text(text, encoding="utf-8")
        counts[f"seq_{split}.txt"] = len(text)

    arith_train, arith_eval = _arithmetic_split(cfg, cfg.eval_size)
    for split, group, n, arith, train in (
        ("train", train_works, cfg.train_size, _arith(arith_train), True),
        ("eval", eval_works, cfg.eval_size, _arith(arith_eval), False),
    ):
        pool = _Pool([w for w in group if w.is_play], cfg, random.Random(f"{cfg.seed}-{split}-choices"))
        rng = random.Random(f"{cfg.seed}-{split}")
        for kind, records in _split_records(pool, arith, n, rng, train).items():
            _write_jsonl(out / f"{kind}_{split}.jsonl", records)
            counts[f"{kind}_{split}.jsonl"] = len(records)

    manifest = {"config": asdict(cfg), "eval_plays": list(EVAL_PLAYS),
                "train_works": [w.name for w in train_works], "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return counts
