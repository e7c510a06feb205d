"""Engine decode speed on the GPU, with and without CUDA graphs, in one process.

    python bench/engine_step.py [--preset qwen3-0.6b] [--num-requests 256] [--modes graphs,compiled-overlap,eager]
                                [--json FILE]

W1 of bench/serve.py through `LLM.generate` (token-id prompts): the preset with random bf16 weights
and a full-vocabulary synthetic tokenizer (so every token is detokenized, as in serving), N
requests with prompt and output lengths uniform in 100-1024 (seed 0), greedy, ignore_eos,
max_num_seqs 256, 16384 batched tokens. Modes:
    graphs         CUDA graphs for decode + overlapped steps
    graphs-serial  CUDA graphs, steps not overlapped
    eager          neither (the engine before this work)
    compiled       graphs-serial with the decode forward through torch.compile (compile_decode)
    compiled-overlap  compiled, with overlapped steps
Each mode first generates a warm-up batch whose sizes sweep 1..40 (Triton compiles its kernels for
each batch shape once; that must not land in the timed run). For graph modes it also times one
replay of the captured decode graph against the same forward run eagerly, at a few batch sizes
(context 1: the fixed cost of a step, without KV reads).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve  # noqa: E402
from common import Row, log  # noqa: E402

MODES = {"graphs": dict(enable_cuda_graphs=True, overlap_steps=True),
         "graphs-serial": dict(enable_cuda_graphs=True, overlap_steps=False),
         "eager": dict(enable_cuda_graphs=False, overlap_steps=False),
         "compiled": dict(enable_cuda_graphs=True, overlap_steps=False, compile_decode=True),
         "compiled-overlap": dict(enable_cuda_graphs=True, overlap_steps=True, compile_decode=True)}
ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=2048)


def replay_vs_eager_ms(graphs: Any, b: int) -> tuple[float, float]:
    """(ms per graph replay, ms per eager forward) at batch b, every row a padding row."""
    import torch

    graphs._fill_padding(b)
    graph = graphs.graphs[b, False]
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    replay = start.elapsed_time(end) / 50
    with torch.inference_mode():
        graphs._forward(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            graphs._forward(b)
        torch.cuda.synchronize()
    return replay, (time.perf_counter() - t) / 20 * 1e3


class Probe:
    """During one run: host wall time per engine phase, and GPU time per launched step (a pair of
    CUDA events around each launch: what the GPU spends on the step, idle gaps excluded)."""

    def __init__(self) -> None:
        from astrai_serve.engine import llm_engine, model_runner, sampler, scheduler

        self.targets = [("wait", sampler.PendingSample, "result"), ("update", scheduler.Scheduler, "update"),
                        ("stops", llm_engine, "finish_reasons"), ("finish", scheduler.Scheduler, "finish"),
                        ("schedule", scheduler.Scheduler, "schedule"), ("forward", model_runner.ModelRunner, "execute"),
                        ("sample", sampler.Sampler, "sample_async"), ("text", llm_engine, "advance_text"),
                        ("outputs", llm_engine, "make_output")]
        self.engine_cls, self.runner_cls = llm_engine.LLMEngine, model_runner.ModelRunner
        self.host = {name: 0.0 for name, _, _ in self.targets}
        self.steps = self.graph_steps = 0
        self.events: list[tuple[Any, Any]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def _patch(self, owner: Any, attr: str, wrapper: Any) -> None:
        self._saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, wrapper)

    def __enter__(self) -> "Probe":
        import torch

        for name, owner, attr in self.targets:
            def timed(*a: Any, _f: Any = getattr(owner, attr), _n: str = name, **k: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    self.host[_n] += time.perf_counter() - t0
            self._patch(owner, attr, timed)
        step, launch, uses = self.engine_cls.step, self.engine_cls._launch, self.runner_cls.uses_graph

        def counting_step(engine: Any) -> Any:
            self.steps += 1
            return step(engine)

        def timed_launch(engine: Any, plan: Any, *args: Any) -> Any:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = launch(engine, plan, *args)
            end.record()
            if out is not None:
                self.events.append((start, end))
            return out

        def counting_uses(runner: Any, plan: Any) -> bool:
            used = uses(runner, plan)
            self.graph_steps += used
            return used

        self._patch(self.engine_cls, "step", counting_step)
        self._patch(self.engine_cls, "_launch", timed_launch)
        self._patch(self.runner_cls, "uses_graph", counting_uses)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)

    def gpu_ms_per_step(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.events) / max(len(self.events), 1)


def run_mode(mode: str, label: str, model: Any, tok: Any, reqs: list[tuple[list[int], int]],
             micro: bool) -> tuple[list[Row], list]:
    from astrai_serve import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM.from_model(model, tok, **ENGINE, **MODES[mode])
    build_s = time.perf_counter() - t
    engine = llm.engine
    # Warm-up, so that no Triton compile lands in the timed run: batch sizes 40 .. 1 (one request
    # ends per step), then the timed run's own prefill steps (all prompts, 4 tokens each).
    sweep = [p[:16] for p, _ in reqs[:40]]
    llm.generate(sweep, [SamplingParams(max_tokens=i + 1, temperature=0.0, ignore_eos=True) for i in range(len(sweep))])
    llm.generate([p for p, _ in reqs], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.reset_prefix_cache()
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    with Probe() as probe:
        cpu0 = time.process_time()
        secs, res = common.timed(lambda: llm.generate([p for p, _ in reqs], params), "cuda")
        cpu = time.process_time() - cpu0
    tokens = sum(len(r.token_ids) for r in res)
    if tokens != sum(n for _, n in reqs):
        raise RuntimeError(f"{mode}: asked for {sum(n for _, n in reqs)} tokens with ignore_eos, got {tokens}")
    graphs = engine.runner.graphs
    n = probe.steps
    period, gpu = secs * 1e3 / n, probe.gpu_ms_per_step()
    host = {k: v * 1e3 / n for k, v in probe.host.items()}
    host["other"] = period - sum(host.values())
    note = (f"{len(reqs)} req, {n} steps ({probe.graph_steps} graph), host CPU {cpu / secs * 100:.0f}% busy, "
            f"engine built in {build_s:.1f} s")
    if graphs is not None:
        note += f" incl. capture of {len(graphs.sizes)} graphs in {graphs.capture_seconds:.1f} s"
    split = ", ".join(f"{k} {v:.2f}" for k, v in host.items())
    rows = [Row("W1", f"astrai {label}", "output tok/s", tokens / secs, note=note,
                peers=[common.key("W1", "astrai eager", "output tok/s")] if mode != "eager" else []),
            Row("W1", f"astrai {label}", "ms/step", period,
                note=f"GPU busy {gpu:.2f} ms/step (events around each launch), idle {100 * (1 - gpu / period):.0f}%; "
                     f"host ms/step: {split}")]
    log(f"{label}: {tokens / secs:,.0f} output tok/s in {secs:.1f} s, {period:.2f} ms/step, GPU {gpu:.2f} ms/step; "
        f"{note}; host ms/step: {split}")
    if graphs is not None and micro:
        for b in (1, 64, 256):
            if (b, False) in graphs.graphs:
                replay, eager = replay_vs_eager_ms(graphs, b)
                rows.append(Row("step", f"decode forward b={b}", "graph replay ms", replay,
                                note=f"eager forward {eager:.2f} ms (context 1: fixed cost, no KV reads)"))
                log(f"b={b}: graph replay {replay:.3f} ms, eager forward {eager:.3f} ms")
    return rows, [r.token_ids for r in res]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/engine_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", help="model preset, random bf16 weights (default qwen3-0.6b)")
    p.add_argument("--num-requests", type=int, default=256, help="W1 requests (default 256)")
    p.add_argument("--modes", default="graphs,compiled-overlap,eager",
                   help=f"comma-separated, run in order (repeats allowed): {', '.join(MODES)}")
    p.add_argument("--json", default="", help="where to write the JSON results (default: none)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"--modes: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})")
    if args.num_requests < 1:
        p.error(f"--num-requests {args.num_requests}: must be >= 1")
    import logging

    import torch


    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = common.environment()
    config, model, tok = common.random_gpu_model(args.preset)
    reqs = serve.w1_requests(serve.Sizes(num_requests=args.num_requests), config.vocab_size)
    log(f"{args.preset} on {env.get('device')}: {len(reqs)} requests, {sum(n for _, n in reqs)} output tokens")
    rows: list[Row] = []
    outputs: dict[str, list] = {}
    for i, mode in enumerate(modes):
        label = mode if mode not in modes[:i] else f"{mode} #{modes[:i].count(mode) + 1}"
        got, outputs[label] = run_mode(mode, label, model, tok, reqs, micro=mode.startswith("graphs")
                                       and not any(m.startswith("graphs") for m in modes[:i]))
        rows += got
        gc.collect()                 # the engine's KV cache (most of the GPU) must go before the next one
        torch.cuda.empty_cache()
    first = next(iter(outputs))
    for label in list(outputs)[1:]:
        same = sum(a == b for a, b in zip(outputs[label], outputs[first]))
        rows.append(Row("W1", f"astrai {label}", f"greedy outputs equal to {first}", same,
                        note=f"of {len(reqs)} (random bf16 weights: near-ties may flip where batch shapes differ)"))
    common.report("bench/engine_step.py", rows, env, {"preset": args.preset, "engine": ENGINE, "modes": modes},
                  args.json or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
