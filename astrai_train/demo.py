"""`make demo`: the embedded default, end to end on a CPU with the project's own commands.

    tokenizer -> task files -> HDF5 -> SEQ -> SFT -> DPO -> GRPO   (astrai eval after each stage)
    -> metrics table + PNGs -> astrai serve -> one OpenAI (streaming) and one gRPC question

Every step is an `astrai ...` subprocess, exactly what a user would type; this file only strings
them together, times them and draws the pictures. `--gpu` is the longer `make demo-gpu` recipe
(the 125m preset); `--quick` shrinks everything for the test suite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("init", "seq", "sft", "dpo", "grpo")
METRICS = (  # (key in `astrai eval --json`, column, better)
    ("perplexity", "held-out perplexity", "lower"),
    ("speaker_accuracy", "speaker id acc", "higher"),
    ("whole_line_preference", "whole-line pref acc", "higher"),
    ("arithmetic_accuracy", "arithmetic acc", "higher"),
)
UNITS = ("tokens", "questions", "pairs", "sums")  # what each metric's n counts
# What each stage's picture shows: the loss, except where another series tells more (GRPO's loss
# hovers near zero by construction; its mean reward is what should climb).
CURVES = {"dpo": ("train/loss", "train/rewards/accuracies"), "grpo": ("train/reward",)}
# Which metric each stage exists to move (the table marks whether it did).
PURPOSE = {"seq": "perplexity", "sft": "speaker_accuracy", "dpo": "whole_line_preference",
           "grpo": "arithmetic_accuracy"}


@dataclass(frozen=True)
class Sizes:
    """Steps and sizes of one demo flavour."""

    vocab: int
    preset: str
    seq_steps: int
    sft_steps: int
    dpo_steps: int
    grpo_steps: int
    train_size: int
    eval_limit: int
    ppl_tokens: int
    max_operand: int
    text_fraction: float  # share of SFT windows that are plain pretraining text (holds perplexity)


# About 6 minutes on the idle 2-core CPU machine (docs/demo.md has the run and its stage times;
# `make setup` adds about 2 more). SFT learns the sums in a jump after a few hundred steps, the
# later the smaller their share of each batch (300 steps of a mix with twice the speaker
# questions left held-out sums at 12%); its 15% plain-text windows keep held-out perplexity near
# the pretrained model's (with none it rose 11-fold).
CPU = Sizes(vocab=2048, preset="tiny", seq_steps=300, sft_steps=400, dpo_steps=100, grpo_steps=70,
            train_size=6000, eval_limit=200, ppl_tokens=8192, max_operand=99, text_fraction=0.15)
QUICK = Sizes(vocab=512, preset="tiny", seq_steps=6, sft_steps=6, dpo_steps=4, grpo_steps=2,
              train_size=200, eval_limit=8, ppl_tokens=512, max_operand=9, text_fraction=0.15)
GPU = Sizes(vocab=8192, preset="125m", seq_steps=4000, sft_steps=1000, dpo_steps=300, grpo_steps=100,
            train_size=20000, eval_limit=400, ppl_tokens=65536, max_operand=99, text_fraction=0.15)
# Answers are at most 4 tokens (a 3-digit sum and the end of turn); an untrained model never
# stops, so a larger budget only costs time.
MAX_ANSWER_TOKENS = 6


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bf16-mixed
    training is about a quarter faster than float32; elsewhere it is emulated, and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def astrai(*args: str, log: Path | None = None) -> None:
    """Run one `astrai` command; stream its output (or keep it in `log`) and stop on failure."""
    cmd = [sys.executable, "-m", "astrai_train.cli", *args]
    print(f"\n$ astrai {' '.join(shlex.quote(a) for a in args)}", flush=True)
    if log is None:
        result = subprocess.run(cmd, cwd=ROOT)
    else:
        with log.open("w") as f:
            result = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"demo: `astrai {args[0]}` failed with exit code {result.returncode}\n{tail}")


TIMES: dict[str, float] = {}  # stage -> wall seconds, for the summary at the end


def stage_line(name: str, seconds: float, where: str) -> None:
    TIMES[name] = seconds
    print(f"[demo] {name:<10} done in {seconds:5.1f}s -> {where}", flush=True)


def make_init_model(out: Path, tokenizer: Path, preset: str) -> Path:
    """The untrained starting point, so the table shows where each metric begins."""
    import shutil

    import torch

    from astrai_train.model import ModelConfig, Transformer
    from astrai_train.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tokenizer)
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.from_preset(preset, vocab_size=tok.vocab_size))
    model.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, out / f.name)
    return out


def train(objective: str, out: Path, steps: int, data: Path, sizes: Sizes, init_from: Path | None,
          tokenizer: Path, extra: list[str]) -> Path:
    name = f"{objective}-demo"
    recipe = ROOT / "configs" / "train" / f"{objective}-tiny.yaml"
    overrides = [f"out_dir={out}", f"name={name}", f"trainer.max_steps={steps}", f"data.train_path={data}",
                 f"checkpoint.every_n_steps={max(steps, 1)}", "trainer.log_every_n_steps=5"]
    if objective == "sft":
        overrides += [f"data.text_path={data.parent / 'seq_train.h5'}", f"data.text_fraction={sizes.text_fraction}"]
    if init_from is None:
        overrides += [f"model.preset={sizes.preset}", f"model.tokenizer={tokenizer}"]
    else:
        overrides += [f"model.init_from={init_from}"]
    astrai("train", "--config", str(recipe), *overrides, *extra)
    return out / name / "model"


def sample_lines(model: Path, out_file: Path) -> None:
    """A few sampled lines from the pretrained model: what SEQ learned, for people to read."""
    astrai("generate", "--model", str(model), "--prompt", "Romeo.\n", "--prompt", "First Citizen.\n",
           "--max-tokens", "60", "--temperature", "0.8", "--seed", "0", log=out_file)
    print(out_file.read_text().rstrip(), flush=True)


def evaluate(model: Path, tasks: Path, sizes: Sizes, out_json: Path) -> dict:
    astrai("eval", "--model", str(model), "--data", str(tasks), "--limit", str(sizes.eval_limit),
           "--ppl-tokens", str(sizes.ppl_tokens), "--max-new-tokens", str(MAX_ANSWER_TOKENS), "--json", str(out_json))
    return json.loads(out_json.read_text())


def flatten(results: dict) -> dict[str, float]:
    """`astrai eval --json` gives {metric: {"value", "prior", "prior_rule", "n", ...}}; keep value,
    prior (the score of a rule that reads only the held-out data), its rule and n."""
    flat = {}
    for key, entry in results.items():
        if isinstance(entry, dict):
            flat[key] = entry.get("value")
            flat[f"{key}_prior"] = entry.get("prior")
            flat[f"{key}_prior_rule"] = entry.get("prior_rule")
            flat[f"{key}_n"] = entry.get("n")
        else:
            flat[key] = entry
    return flat


def bar(key: str, better: str, before: dict[str, float]) -> tuple[float, str]:
    """What a stage must beat on `key`: the model it started from or the data-only prior (of the
    same held-out items), whichever scores better. (value, which one)"""
    prev, prior = before[key], before.get(f"{key}_prior")
    if prior is None:
        return prev, "previous"
    if better == "lower":
        return (prev, "previous") if prev <= prior else (prior, "prior")
    return (prev, "previous") if prev >= prior else (prior, "prior")


def moved(key: str, better: str, before: dict[str, float], after: dict[str, float]) -> str:
    """✓: better than the bar (the previous stage's model or the prior, whichever is stronger)
    by more than noise; ~: within noise of it; ✗: worse by more than noise. An accuracy over n
    held-out items is noise up to two standard errors of the difference,
    2 sqrt((p1 (1 - p1) + p2 (1 - p2)) / n); perplexity over thousands of tokens is not noisy at
    the digits shown."""
    p1, _ = bar(key, better, before)
    p2 = after[key]
    if better == "lower":
        return "✓" if p2 < p1 else "✗"
    n = after.get(f"{key}_n") or 1
    noise = 2 * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    return "✓" if p2 - p1 > noise else "✗" if p1 - p2 > noise else "~"


def format_table(rows: dict[str, dict[str, float]]) -> str:
    head = f"{'after stage':<12}" + "".join(f"{col:>22}" for _, col, _ in METRICS)
    lines = [head, "-" * len(head)]
    first = next(iter(rows.values()))
    lines.append(f"{'(prior)':<12}" + "".join(
        f"{_fmt(first.get(f'{k}_prior'), k):>22}" for k, _, _ in METRICS))
    lines.append(f"{'(held out)':<12}" + "".join(
        f"{_count(first.get(f'{k}_n'), unit):>22}" for (k, _, _), unit in zip(METRICS, UNITS)))
    prev = None
    misses = []  # stages that did not move their metric beyond noise, said in words under the table
    for stage, r in rows.items():
        cells = []
        for key, col, better in METRICS:
            cell = _fmt(r.get(key), key)
            if prev is not None and PURPOSE.get(stage) == key:
                mark = moved(key, better, prev, r)
                cell += " " + mark
                if mark != "✓":
                    value, which = bar(key, better, prev)
                    against = (f"the prior ({prev.get(f'{key}_prior_rule')}, {_fmt(value, key)})" if which == "prior"
                               else f"the model it started from ({_fmt(value, key)})")
                    misses.append(f"{stage.upper()} does not beat {against} on {col} by more than noise.")
            cells.append(f"{cell:>22}")
        lines.append(f"{stage:<12}" + "".join(cells))
        prev = r
    rules = "; ".join(f"{col}: {first.get(f'{k}_prior_rule')}" for k, col, _ in METRICS
                      if first.get(f"{k}_prior_rule"))
    lines.append(f"(prior): the score of a rule that reads only the held-out data ({rules}).")
    lines.append("✓ / ~ / ✗: the metric the stage is for (SEQ perplexity, SFT speaker id, DPO whole-line "
                 "preference, GRPO arithmetic) against the stronger of the previous stage's model and the "
                 "prior: better by more than noise (2 standard errors) / within noise / worse.")
    lines += misses
    if "seq" in rows and "sft" in rows and rows["seq"].get("perplexity"):
        ratio = rows["sft"]["perplexity"] / rows["seq"]["perplexity"]
        lines.append(f"SFT's held-out perplexity is {ratio:.2f}x SEQ's.")
    return "\n".join(lines)


def _count(n: float | None, unit: str) -> str:
    return "-" if n is None else f"{int(n):,} {unit}"


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.1f}" if key == "perplexity" else f"{100 * value:.1f}%"


def draw(rows: dict[str, dict[str, float]], out: Path, runs: dict[str, Path]) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from astrai_train.objectives.plots import read_history

    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2))
    for ax, (stage, run_dir) in zip(axes, runs.items()):
        keys = CURVES.get(stage, ("train/loss",))
        history = read_history(run_dir / "logs", keys)
        for key in keys:
            points = history.get(key) or []
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=key)
        ax.set_title(f"{stage.upper()}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    curves = out / "loss_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    stages = list(rows)
    for ax, (key, col, better) in zip(axes, METRICS):
        values = [rows[s].get(key) or 0.0 for s in stages]
        ax.bar(stages, values, color=["#999"] + ["#3b7dd8"] * (len(stages) - 1))
        prior = rows[stages[0]].get(f"{key}_prior")
        if prior is not None:
            ax.axhline(prior, color="#d33", linestyle="--", label=f"prior: {rows[stages[0]].get(f'{key}_prior_rule')}")
            ax.legend(fontsize=7)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_title(f"{col} ({better} is better)", fontsize=9)
    fig.tight_layout()
    table = out / "metrics.png"
    fig.savefig(table, dpi=110)
    plt.close(fig)
    return curves, table


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(model: Path, out: Path, question: str) -> None:
    """Start `astrai serve`, ask once over OpenAI (streaming) and once over gRPC, shut down."""
    import urllib.request

    grpc_port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "astrai_train.cli", "serve", "--model", str(model),
           "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    print(f"\n$ astrai serve --model {model} --grpc-port {grpc_port} --http-port {http_port}", flush=True)
    log = (out / "serve.log").open("w")
    daemon = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if daemon.poll() is not None or time.time() > deadline:
                raise SystemExit(f"demo: astrai serve did not come up; see {out / 'serve.log'}")
            time.sleep(0.5)

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused")
        print(f"\nOpenAI client (streaming) asks: {question}\n  answer: ", end="", flush=True)
        stream = client.chat.completions.create(model=client.models.list().data[0].id, stream=True,
                                                messages=[{"role": "user", "content": question}],
                                                max_tokens=24, temperature=0)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()

        import grpc

        from astrai_serve.proto import generate_pb2 as pb2
        from astrai_serve.proto import generate_pb2_grpc as pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb2_grpc.GenerationServiceStub(channel)
            request = pb2.GenerateRequest(
                request_id="demo-1",
                messages=pb2.ChatMessages(messages=[pb2.ChatMessage(role="user", content=question)]),
                params=pb2.SamplingParams(max_tokens=24, temperature=0.0))
            print(f"gRPC Generate stream asks the same\n  answer: ", end="", flush=True)
            for response in stub.Generate(request, timeout=120):
                print(response.text, end="", flush=True)
            print()
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        log.close()
        print(f"astrai serve shut down cleanly (exit code {code})" if code == 0 else
              f"astrai serve exited with code {code}; see {out / 'serve.log'}")
        if code != 0:
            raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astrai_train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="output directory (default: runs/demo)")
    flavour = parser.add_mutually_exclusive_group()
    flavour.add_argument("--gpu", action="store_true", help="the longer 125m recipe (make demo-gpu)")
    flavour.add_argument("--quick", action="store_true", help="a seconds-long smoke version (used by tests)")
    args = parser.parse_args(argv)
    sizes = GPU if args.gpu else QUICK if args.quick else CPU
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    t = time.time()
    tokenizer = out / "tokenizer"
    astrai("tokenizer", "train", "--input", *sorted(str(p) for p in (ROOT / "data" / "shakespeare").glob("*_gut.txt.gz")),
           "--vocab-size", str(sizes.vocab), "--out", str(tokenizer))
    stage_line("tokenizer", time.time() - t, str(tokenizer))

    t = time.time()
    tasks = out / "tasks"
    astrai("tasks", "--corpus", str(ROOT / "data" / "shakespeare"), "--out", str(tasks),
           "--train-size", str(sizes.train_size), "--eval-size", str(max(sizes.eval_limit, 50)),
           "--max-operand", str(sizes.max_operand))
    data = out / "data"
    data.mkdir(exist_ok=True)
    inputs = {"seq": tasks / "seq_train.txt", "sft": tasks / "sft_train.jsonl",
              "dpo": tasks / "dpo_train.jsonl", "grpo": tasks / "grpo_train.jsonl"}
    for objective, src in inputs.items():
        astrai("prepare", objective, "--tokenizer", str(tokenizer), "--input", str(src),
               "--out", str(data / f"{objective}_train.h5"))
    stage_line("data", time.time() - t, f"{tasks} and {data}")

    rows: dict[str, dict[str, float]] = {}
    runs: dict[str, Path] = {}
    t = time.time()
    model = make_init_model(out / "init-model", tokenizer, sizes.preset)
    rows["init"] = flatten(evaluate(model, tasks, sizes, out / "eval_init.json"))
    stage_line("init eval", time.time() - t, str(out / "eval_init.json"))

    steps = {"seq": sizes.seq_steps, "sft": sizes.sft_steps, "dpo": sizes.dpo_steps, "grpo": sizes.grpo_steps}
    # SEQ and SFT are most of the CPU time, and plain next-token losses that bf16 autocast suits;
    # DPO and GRPO compare log-probabilities of two models (or of a rollout and a replay) and stay
    # in float32 on a CPU.
    fast = ["--accelerator", "gpu"] if args.gpu else ["--precision", "bf16-mixed"] if cpu_has_bf16() else []
    extra = {"seq": fast, "sft": fast, "dpo": fast if args.gpu else [], "grpo": fast if args.gpu else []}
    init_from: Path | None = None
    for objective in ("seq", "sft", "dpo", "grpo"):
        t = time.time()
        model = train(objective, out, steps[objective], data / f"{objective}_train.h5", sizes, init_from,
                      tokenizer, extra=extra[objective])
        runs[objective] = model.parent
        rows[objective] = flatten(evaluate(model, tasks, sizes, out / f"eval_{objective}.json"))
        init_from = model
        if objective == "seq":
            sample_lines(model, out / "sample_seq.txt")
        stage_line(objective.upper(), time.time() - t, f"{model} (loss curve {model.parent / 'loss.png'})")

    table = format_table(rows)
    (out / "metrics.txt").write_text(table + "\n")
    (out / "metrics.json").write_text(json.dumps(rows, indent=2) + "\n")
    curves, bars = draw(rows, out, runs)
    print("\n" + table)
    stage_line("figures", 0.0, f"{curves}, {bars}, {out / 'metrics.txt'}")

    t = time.time()
    serve_and_ask(init_from, out, "What is 3 + 4?")
    stage_line("serve", time.time() - t, str(out / "serve.log"))
    TIMES["total"] = time.time() - t_all
    (out / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in TIMES.items()}, indent=2) + "\n")
    print("\n[demo] stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMES.items() if k != "total"))
    print(f"[demo] finished in {TIMES['total']:.0f}s; everything is under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
