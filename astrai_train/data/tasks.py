"""Real task data from the Shakespeare corpus, in the JSONL formats TRL uses.

A fixed split holds out whole plays (EVAL_PLAYS) so evaluation never sees a line the model was
trained on. Every file is derived deterministically from the corpus and the seed.

    seq_{train,eval}.txt     the text itself (poems included in train)
    sft_{train,eval}.jsonl   {"messages": [user, assistant], "task"}: speaker / next line / arithmetic
    dpo_{train,eval}.jsonl   {"prompt": [user], "chosen": [assistant], "rejected": [assistant], "task"}
    grpo_{train,eval}.jsonl  {"prompt": [user], "answer": str, "task"}: speaker / arithmetic

The tasks are shaped to be learnable by a tiny model in CPU minutes: speaker questions are
multiple choice among the play's most frequent speakers (listed in the prompt, most frequent
first), and only short lines are used. "task" is an extra column that TRL ignores and `astrai eval` groups by.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable

from .corpus import Work, frequent_speakers, load_corpus

# Whole plays held out for evaluation: two tragedies, two comedies, all with plenty of turns.
EVAL_PLAYS = ("julius_caesar_gut", "macbeth_gut", "tempest_gut", "twelfth_night_gut")

# Mixtures (fractions of each file's examples); the remainder of SFT is next-line questions.
SFT_SPEAKER_SHARE = 0.4
SFT_ARITHMETIC_SHARE = 0.2
GRPO_ARITHMETIC_SHARE = 0.5


@dataclass(frozen=True)
class TaskConfig:
    """How many examples of what shape `derive_tasks` writes."""

    train_size: int = 4000      # examples in each *_train.jsonl
    eval_size: int = 400        # examples in each *_eval.jsonl (fewer if the held-out plays run out)
    choices: int = 4            # speakers offered per speaker question: the play's most frequent ones
    min_line_chars: int = 12    # shorter lines carry too little to guess from
    max_line_chars: int = 60    # longer lines are skipped: short targets are learnable by tiny models
    max_operand: int = 99       # arithmetic questions add two integers in [0, max_operand]
    renamed_pct: int = 50       # % of training speaker questions whose names are swapped (see _speaker_qa)
    seed: int = 0               # every random choice derives from this

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"TaskConfig.{f.name} must be a non-negative integer, got {value!r}")
        if self.renamed_pct > 100:
            raise ValueError(f"TaskConfig.renamed_pct must be at most 100, got {self.renamed_pct}")
        if self.choices < 2:
            raise ValueError(f"TaskConfig.choices must be at least 2, got {self.choices}")
        if self.min_line_chars > self.max_line_chars:
            raise ValueError(f"TaskConfig.min_line_chars ({self.min_line_chars}) exceeds "
                             f"max_line_chars ({self.max_line_chars})")


def speaker_prompt(title: str, choices: list[str], line: str) -> str:
    return f"Who speaks this line in {title}? Choose from: {', '.join(choices)}.\n{line}"


def next_line_prompt(line: str) -> str:
    return f"What line follows: {line}"


def arithmetic_prompt(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


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


class _Pool:
    """Candidate questions of one split (train or eval plays)."""

    def __init__(self, plays: list[Work], cfg: TaskConfig) -> None:
        ok = lambda s: cfg.min_line_chars <= len(s) <= cfg.max_line_chars  # noqa: E731
        self.speaker: list[tuple[str, tuple[str, ...], str, str]] = []  # (title, choices, line, speaker)
        self.next_line: list[tuple[str, str, str]] = []  # (line, next line, play)
        for play in plays:
            # Most frequent first: "the lead speaks most" is a real prior that carries over to
            # unseen plays, and it teaches a small model to answer with a name from the prompt.
            top = frequent_speakers(play.turns, cfg.choices)
            for turn in play.turns:
                if turn.speaker in top:
                    self.speaker += [(play.title, tuple(top), ln, turn.speaker) for ln in turn.lines if ok(ln)]
                for a, b in zip(turn.lines, turn.lines[1:]):
                    if ok(a) and ok(b) and a != b:
                        self.next_line.append((a, b, play.name))
        self.lines_by_play: dict[str, list[str]] = {}
        for a, b, play in self.next_line:
            self.lines_by_play.setdefault(play, []).append(b)
        self.names = sorted({name for _, top, _, _ in self.speaker for name in top})
        self.renamed_pct = 0  # set for the training split


def _speaker_qa(item: tuple[str, tuple[str, ...], str, str], pool: _Pool, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) of a speaker question. With probability renamed_pct the play's names are
    swapped, position for position, for names from other plays: then only the prompt tells which
    name to answer, so the model learns to answer from the listed choices instead of memorising
    line -> name, and that is what carries over to the held-out plays."""
    title, top, line, speaker = item
    if pool.renamed_pct and rng.randrange(100) < pool.renamed_pct:
        others = [n for n in pool.names if n not in top]
        if len(others) >= len(top):
            names = rng.sample(others, len(top))
            return speaker_prompt(title, names, line), names[top.index(speaker)]
    return speaker_prompt(title, list(top), line), speaker


def _arithmetic_split(cfg: TaskConfig, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(cfg.max_operand + 1) for b in range(cfg.max_operand + 1)]
    random.Random(cfg.seed).shuffle(pairs)
    n_eval = min(n_eval, len(pairs) // 2)
    return pairs[n_eval:], pairs[:n_eval]


def _arith(pairs: list[tuple[int, int]]) -> list[tuple[str, str]]:
    return [(arithmetic_prompt(a, b), str(a + b)) for a, b in pairs]


def _split_records(pool: _Pool, arith: list[tuple[str, str]], n: int, rng: random.Random,
                   repeat: bool) -> dict[str, list[dict[str, Any]]]:
    n_sp, n_ar = int(n * SFT_SPEAKER_SHARE), int(n * SFT_ARITHMETIC_SHARE)
    sft = [{"messages": _user(p) + _assistant(a), "task": "speaker"}
           for p, a in (_speaker_qa(it, pool, rng) for it in _take(pool.speaker, n_sp, rng, repeat))]
    sft += [{"messages": _user(next_line_prompt(x)) + _assistant(y), "task": "next_line"}
            for x, y, _ in _take(pool.next_line, n - n_sp - n_ar, rng, repeat)]
    sft += [{"messages": _user(p) + _assistant(a), "task": "arithmetic"} for p, a in _take(arith, n_ar, rng, repeat)]
    rng.shuffle(sft)

    # DPO: the rejected line comes from another play of the same split, so it is fluent
    # Shakespeare that simply does not follow.
    other_plays = sorted(pool.lines_by_play)
    dpo = []
    for x, y, play in _take(pool.next_line, n, rng, repeat):
        others = [p for p in other_plays if p != play] or other_plays
        rejected = rng.choice(pool.lines_by_play[rng.choice(others)])
        if rejected == y:
            continue
        dpo.append({"prompt": _user(next_line_prompt(x)), "chosen": _assistant(y),
                    "rejected": _assistant(rejected), "task": "next_line"})

    n_ga = int(n * GRPO_ARITHMETIC_SHARE)
    grpo = [{"prompt": _user(p), "answer": a, "task": "speaker"}
            for p, a in (_speaker_qa(it, pool, rng) for it in _take(pool.speaker, n - n_ga, rng, repeat))]
    grpo += [{"prompt": _user(p), "answer": a, "task": "arithmetic"} for p, a in _take(arith, n_ga, rng, repeat)]
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
    for split, group, n, arith, repeat in (
        ("train", train_works, cfg.train_size, _arith(arith_train), True),
        ("eval", eval_works, cfg.eval_size, _arith(arith_eval), False),
    ):
        pool = _Pool([w for w in group if w.is_play], cfg)
        pool.renamed_pct = cfg.renamed_pct if split == "train" else 0
        rng = random.Random(f"{cfg.seed}-{split}")
        for kind, records in _split_records(pool, arith, n, rng, repeat).items():
            _write_jsonl(out / f"{kind}_{split}.jsonl", records)
            counts[f"{kind}_{split}.jsonl"] = len(records)

    manifest = {"config": asdict(cfg), "eval_plays": list(EVAL_PLAYS),
                "train_works": [w.name for w in train_works], "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return counts
