"""Reading the Shakespeare corpus: works, titles, and plays as (speaker, speech) turns.

The Gutenberg texts mark a speech with a heading line that holds only the speaker's name and
(usually) a full stop, then the speech up to the next blank line:

    Ber.                 <- abbreviated (Hamlet, Lear)
    Who's there?

    LADY MACBETH.        <- upper case (most plays)
    ...

    THESEUS              <- upper case without the stop (A Midsummer Night's Dream)

Stage directions are [bracketed], sometimes across lines, sometimes inside a speech; they are
removed before parsing so they neither split a speech nor leak into it.
"""
from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Works without speakers: the speaker tasks skip them, the seq text keeps them.
POEMS = frozenset({
    "sonnets_gut", "lovers_complaint_gut", "passionate_pilgrim_gut", "phoenix_and_the_turtle_gut",
    "rape_of_lucrece_gut", "venus_and_adonis_gut",
})
# A parsed "play" with fewer turns than this is treated as a poem (its headings were noise).
MIN_TURNS = 100

_WORD = r"[A-Z][A-Za-z'\-]*\.?"
_HEADING_DOT = re.compile(rf"^{_WORD}(?: (?:{_WORD}|of|the|and|de|le|la)){{0,3}}\.$")
_HEADING_CAPS = re.compile(r"^[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,3}$")
_NOT_SPEAKERS = re.compile(
    r"^(ACT|SCENE|Scene|Act|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction|THE END|FINIS|"
    r"PERSONS|DRAMATIS|Dramatis|Persons|CHORUS\b.*\bACT|[IVXLC]+\.?$)"
)


@dataclass(frozen=True)
class Turn:
    """One speech of a play."""

    speaker: str       # normalised display name, e.g. "Lady Macbeth", "Hamlet"
    lines: tuple[str, ...]  # the speech's text lines, stripped, stage directions removed


@dataclass(frozen=True)
class Work:
    """One file of the corpus."""

    name: str          # file stem without ".txt.gz", e.g. "hamlet_gut"
    title: str         # from metadata.txt.gz, e.g. "Hamlet"
    text: str          # the whole text, as shipped
    turns: tuple[Turn, ...]  # empty for poems

    @property
    def is_play(self) -> bool:
        return len(self.turns) >= MIN_TURNS


def read_text(path: Path) -> str:
    """A corpus file as text (gzip or plain), with Unix line ends."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read().replace("\r\n", "\n").replace("\r", "\n")


def read_titles(corpus_dir: Path) -> dict[str, str]:
    """`[name]` sections of metadata.txt(.gz) -> their `title = ...` value."""
    for candidate in ("metadata.txt.gz", "metadata.txt"):
        path = corpus_dir / candidate
        if path.exists():
            break
    else:
        return {}
    titles: dict[str, str] = {}
    section = None
    for line in read_text(path).splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section and line.startswith("title") and "=" in line:
            titles[section] = line.split("=", 1)[1].strip()
    return titles


def _strip_directions(text: str) -> list[str]:
    """Lines with [bracketed] directions removed; a line that held only a direction disappears
    (rather than becoming blank, which would end the speech it sits in)."""
    out: list[str] = []
    depth = 0
    for raw in text.split("\n"):
        if not raw.strip():
            depth = 0  # an unclosed bracket (a typo in the source) must not swallow the rest
        kept = []
        for ch in raw:
            if ch == "[":
                depth += 1
            elif ch == "]" and depth:
                depth -= 1
            elif depth == 0:
                kept.append(ch)
        line = "".join(kept).strip()
        if line or not raw.strip():
            out.append(line)
    return out


def _is_heading(line: str) -> bool:
    if not line or len(line) > 40 or _NOT_SPEAKERS.match(line):
        return False
    return bool(_HEADING_DOT.match(line) or _HEADING_CAPS.match(line))


def _persons(lines: list[str]) -> set[str]:
    """Capitalised words of the cast list, used to expand abbreviated headings ("Ber." -> Bernardo)."""
    words: set[str] = set()
    for line in lines:
        if line.startswith(("ACT", "Act ")):
            break
        words.update(w.removesuffix("'s") for w in re.findall(r"[A-Z][a-z']+", line))
    return words


def _normalise(heading: str, persons: set[str]) -> str:
    name = heading.rstrip(".").strip()
    if name.isupper():
        small = {"OF": "of", "THE": "the", "AND": "and", "DE": "de", "LE": "le", "LA": "la"}
        words = name.split()
        return " ".join([words[0].capitalize()] + [small.get(w, w.capitalize()) for w in words[1:]])
    if " " not in name and name not in persons:
        matches = {p for p in persons if p.startswith(name) and p != name}
        if len(matches) == 1:
            return matches.pop()
    return name


def parse_turns(text: str) -> list[Turn]:
    """All speeches of a play, in order."""
    lines = _strip_directions(text)
    persons = _persons(lines)
    turns: list[Turn] = []
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        prev_blank = i == 0 or not lines[i - 1]
        if prev_blank and _is_heading(line) and i + 1 < n and lines[i + 1]:
            j = i + 1
            speech = []
            while j < n and lines[j]:
                speech.append(lines[j])
                j += 1
            turns.append(Turn(_normalise(line, persons), tuple(speech)))
            i = j
        else:
            i += 1
    return turns


def load_corpus(corpus_dir: str | Path) -> list[Work]:
    """Every `*.txt.gz` / `*.txt` work of a corpus directory (metadata excluded), sorted by name."""
    corpus_dir = Path(corpus_dir)
    if not corpus_dir.is_dir():
        raise FileNotFoundError(f"corpus directory {str(corpus_dir)!r} does not exist")
    titles = read_titles(corpus_dir)
    works = []
    for path in sorted(corpus_dir.iterdir()):
        name = path.name.removesuffix(".gz").removesuffix(".txt")
        if not path.name.endswith((".txt", ".txt.gz")) or name == "metadata" or name.upper() == "README":
            continue
        text = read_text(path)
        turns = () if name in POEMS else tuple(parse_turns(text))
        works.append(Work(name, titles.get(name, name.removesuffix("_gut").replace("_", " ").title()),
                          text, turns))
    if not works:
        raise FileNotFoundError(f"no *.txt or *.txt.gz works found in {str(corpus_dir)!r}")
    return works


def frequent_speakers(turns: tuple[Turn, ...] | list[Turn], k: int) -> list[str]:
    """The k speakers with the most speeches (ties broken by name, so the result is stable)."""
    counts = Counter(t.speaker for t in turns)
    return [s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
