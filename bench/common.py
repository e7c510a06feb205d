"""What both benchmarks share: the result row, the one printed table, the JSON file, the
environment record (device, versions), timing helpers and the random-weight model directory.

A benchmark measures systems side by side in one run; every figure is a `Row`, and a row may
name the peer row it is compared with, so the ratio is computed here, once, the same way for all.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # `python bench/serve.py` from a checkout that was never pip-installed still finds the packages.
    sys.path.insert(0, str(ROOT))


@dataclass
class Row:
    workload: str                 # W1..W4 / train / rollout: which measurement
    system: str                   # who was measured: astrai, hf generate_batch, ...
    metric: str                   # what, with its unit: "output tok/s", "ms/token", ...
    value: float | None           # the figure; None when the system could not run (see note)
    peers: list[str] = field(default_factory=list)  # keys ("workload|system|metric") of rows to compare with
    ratios: dict[str, float] = field(default_factory=dict)  # peer system -> value / peer value (finish_ratios)
    note: str = ""                # conditions worth knowing (subset sizes, errors, settings)

    @property
    def key(self) -> str:
        return f"{self.workload}|{self.system}|{self.metric}"


def key(workload: str, system: str, metric: str) -> str:
    return f"{workload}|{system}|{metric}"


def finish_ratios(rows: list[Row]) -> None:
    """ratios[peer system] = value / peer value, for every named peer row that has a value."""
    by_key = {r.key: r for r in rows}
    for r in rows:
        r.ratios = {}
        for peer_key in r.peers:
            peer = by_key.get(peer_key)
            if peer is not None and r.value is not None and peer.value:
                r.ratios[peer.system] = r.value / peer.value


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(rows: list[Row]) -> str:
    """One fixed-width table: workload, system, metric, value, ratio vs peer, note."""
    header = ("workload", "system", "metric", "value", "ratio vs peer", "note")
    lines = []
    for r in rows:
        ratio = "; ".join(f"{v:.2f}x {name}" for name, v in r.ratios.items()) or "-"
        lines.append((r.workload, r.system, r.metric, _fmt(r.value), ratio, r.note))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]
    widths[-1] = 0  # the note is last and unpadded

    def line(cells: Iterable[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths[:-1]) + "  ----"
    return "\n".join([line(header), rule, *(line(c) for c in lines)])


def environment() -> dict[str, Any]:
    """Device and versions: a figure means nothing without them."""
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for name in ("transformers", "lightning", "triton", "tokenizers", "openai"):
        try:  # from the installed metadata: importing lightning alone takes seconds
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # triton on CPU machines: recorded as absent
            env[name] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    try:
        # "+dirty": the tree measured differs from that commit (a working copy shipped to a GPU
        # machine keeps the commit it was cloned at), so the commit alone does not name the code.
        env["git_commit"] = subprocess.run(["git", "describe", "--always", "--dirty=+dirty", "--abbrev=7"],
                                           cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def write_json(path: str | Path, bench: str, env: dict[str, Any], rows: list[Row], settings: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "environment": env, "settings": settings, "rows": [asdict(r) for r in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def report(bench: str, rows: list[Row], env: dict[str, Any], settings: dict[str, Any], json_path: str | Path | None) -> None:
    """Ratios, the table (stdout) and the JSON file: the single output of a benchmark."""
    finish_ratios(rows)
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "lightning", "triton") if env.get(k))
    print(f"\n{bench} on {env.get('device')} ({versions})")
    print(format_table(rows))
    if json_path:
        out = write_json(json_path, bench, env, rows, settings)
        print(f"\nJSON written to {out}")


# ---- timing ------------------------------------------------------------------------------------

def synchronize(device: Any = None) -> None:
    import torch

    if torch.cuda.is_available() and (device is None or str(device).startswith("cuda")):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Any = None) -> tuple[float, Any]:
    """(seconds, result) of fn(), with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def parse_value(text: str) -> Any:
    """A command-line value as JSON where it parses (3, 0.5, true, null), else the string itself;
    `false`/`true` in any case."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


def key_values(parser: Any, flag: str, items: list[str]) -> dict[str, Any]:
    """`--flag KEY=VALUE` items as a dict of parsed values; a malformed one is a usage error."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            parser.error(f"{flag} {item!r}: want KEY=VALUE")
        out[name] = parse_value(value)
    return out


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(values)
    if not s:
        return math.nan
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Budget:
    """A wall-clock allowance: peers that would overrun it are measured on a subset instead."""

    seconds: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


# ---- a random-weight model directory -----------------------------------------------------------

def _synthetic_words(alphabet: str, count: int) -> list[str]:
    """`count` distinct strings of length >= 2 over `alphabet`, shortest first, so every word's
    prefix (word[:-1]) comes before it: the BPE merge (prefix, last char) builds it."""
    words: list[str] = []
    layer = list(alphabet)
    while len(words) < count:
        layer = [w + c for w in layer for c in alphabet]
        words.extend(layer[: count - len(words)])
    return words


def synthetic_tokenizer(vocab_size: int, out_dir: str | Path) -> Any:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids, every one of which decodes to
    ASCII letters, saved into out_dir.

    Why not a trained one: the benchmark model has random weights, so it emits any id of its
    151,936-token vocabulary. A tokenizer trained on the small corpus knows ~1% of those ids; the
    rest would decode to nothing, which makes detokenization unrealistically cheap and leaves a
    streaming client without text deltas (so no first-token time). A full-size synthetic
    vocabulary gives every generated token real text, as a real Qwen3 tokenizer would.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from astrai_train.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, Tokenizer, TokenizerSettings

    alphabet_bytes = pre_tokenizers.ByteLevel.alphabet()
    base = len(SPECIAL_TOKENS) + len(alphabet_bytes)
    if vocab_size < base + 2:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least {base + 2} ids")
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet_bytes):
        vocab[ch] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    merges = []
    for word in _synthetic_words(letters, vocab_size - base):
        vocab[word] = len(vocab)
        merges.append((word[:-1], word[-1]))
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    settings = TokenizerSettings(eos_token=EOS_TOKEN, bos_token=BOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=None)
    tokenizer = Tokenizer(backend, settings)
    if tokenizer.vocab_size != vocab_size:
        raise RuntimeError(f"synthetic tokenizer has {tokenizer.vocab_size} ids, wanted {vocab_size}")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def random_model_dir(preset: str, out_dir: str | Path, dtype: str = "bfloat16", seed: int = 0,
                     **overrides: Any) -> Path:
    """Save the preset with random weights (in `dtype`) plus a full-vocabulary tokenizer as a
    model directory; weights are initialised on the GPU when there is one (seconds, not a minute)."""
    import torch

    from astrai_train.model import ModelConfig, Transformer

    out_dir = Path(out_dir)
    config = ModelConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Transformer(config)
    model.to(getattr(torch, dtype)).save_pretrained(out_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    synthetic_tokenizer(config.vocab_size, out_dir)
    return out_dir


# ---- phases in their own processes -------------------------------------------------------------

def run_isolated(script: str | Path, phase: str, spec: dict[str, Any], timeout_s: float, workdir: Path,
                 extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase of a benchmark as `python SCRIPT --phase NAME --spec FILE --phase-out FILE`.

    A fresh process per system gives each one the whole GPU (memory from the previous one is
    really gone, the peak-memory counter starts at zero), and a crash, an OOM or a hang costs
    that system's remaining rows only: the rows it wrote before (a Sink writes the file after
    every measurement) are kept, the other systems are still measured, the table still printed.
    Returns {"rows": [...]} plus "error" when the process failed. Its output goes to ours (the log).
    """
    spec_path, out_path = workdir / f"{phase}.spec.json", workdir / f"{phase}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(script), "--phase", phase, "--spec", str(spec_path), "--phase-out", str(out_path)]
    start = time.perf_counter()
    error = None
    try:
        code = subprocess.run(cmd, env=env, timeout=timeout_s).returncode
        if code != 0:
            error = f"phase process exited with code {code} (traceback in the log)"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s:.0f} s"
    log(f"phase {phase}: {time.perf_counter() - start:.1f} s" + (f" ({error})" if error else ""))
    result = json.loads(out_path.read_text()) if out_path.is_file() else {"rows": []}
    if error:
        result["error"] = error
    return result


class Sink:
    """Where a phase puts its rows; with a path, the file is rewritten after every add, so a
    phase killed half-way still hands over what it measured."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.rows: list[Row] = []

    def add(self, *rows: Row) -> None:
        self.rows.extend(rows)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rows": [asdict(r) for r in self.rows]}))
            tmp.replace(self.path)


def run_phase(phases: dict[str, Callable[[dict[str, Any], Sink], None]], phase: str, spec: dict[str, Any],
              isolate: bool, script: str | Path, timeout_s: float, workdir: Path,
              extra_env: dict[str, str] | None = None) -> tuple[list[Row], str | None]:
    """(rows, error or None) of one phase, in a child process or in this one."""
    log(f"phase {phase}")
    if isolate:
        result = run_isolated(script, phase, spec, timeout_s, workdir, extra_env)
        return [Row(**r) for r in result.get("rows", [])], result.get("error")
    sink = Sink()
    start = time.perf_counter()
    try:
        phases[phase](spec, sink)
    except Exception as exc:  # one system failing must not lose the others' figures
        import traceback

        traceback.print_exc()
        return sink.rows, f"{type(exc).__name__}: {exc}"
    finally:
        log(f"phase {phase}: {time.perf_counter() - start:.1f} s")
    return sink.rows, None


def phase_main(phases: dict[str, Callable[[dict[str, Any], Sink], None]], phase: str, spec_path: str, out_path: str) -> int:
    """Body of a phase child process."""
    phases[phase](json.loads(Path(spec_path).read_text()), Sink(out_path))
    return 0


def fill_missing(rows: list[Row], expected: list[Row], error: str) -> list[Row]:
    """Rows of a failed phase: what it measured, plus the expected rows it never got to, valueless."""
    have = {r.key for r in rows}
    missing = [Row(r.workload, r.system, r.metric, None, note=f"failed: {error}") for r in expected if r.key not in have]
    return rows + missing


_T0 = time.perf_counter()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since the benchmark started (the time budget)."""
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def cli_main(prog: str, parse_args: Callable[[Any], Any], run: Callable[[Any], int], argv: Any) -> int:
    """Parse and run a bench; a bad preset, size or path is one line on stderr and exit code 2."""
    try:
        return run(parse_args(argv))
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


def run_setup(tiny: bool) -> tuple[str, int, dict[str, str]]:
    """(device, torch threads to restore at the end, env for child processes) of one bench run.

    Toy sizes on the CPU get one thread: their matmuls gain nothing from threads, and on a busy
    machine spinning OpenMP threads make them ~10x slower. The caller restores the thread count,
    since a bench's main() may run inside a test process.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads_before, env = torch.get_num_threads(), {}
    if tiny and device == "cpu":
        torch.set_num_threads(1)
        env["OMP_NUM_THREADS"] = "1"
    return device, threads_before, env
