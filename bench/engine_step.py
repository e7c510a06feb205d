"""Engine decode speed on the GPU, with and without CUDA graphs, in one process.

    python bench/engine_step.py [--preset qwen3-0.6b] [--num-requests 256] [--modes graphs,eager,graphs-serial]
                                [--json FILE]

W1 of bench/serve.py through `LLM.generate` (token-id prompts): the preset with random bf16 weights
and a full-vocabulary synthetic tokenizer (so every token is detokenized, as in serving), N
requests with prompt and output lengths uniform in 100-1024 (seed 0), greedy, ignore_eos,
max_num_seqs 256, 16384 batched tokens. Modes:
    graphs         CUDA graphs for decode + overlapped steps (the engine's default on CUDA)
    graphs-serial  CUDA graphs, steps not overlapped
    eager          neither (the engine before this work)
Each mode first generates a warm-up batch whose sizes sweep 1..40 (Triton compiles its kernels for
each batch shape once; that must not land in the timed run). For graph modes it also times one
replay of the captured decode graph against the same forward run eagerly, at a few batch sizes
(context 1: the fixed cost of a step, without KV reads).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve  # noqa: E402
from common import Row, log  # noqa: E402

MODES = {"graphs": dict(enable_cuda_graphs=True, overlap_steps=True),
         "graphs-serial": dict(enable_cuda_graphs=True, overlap_steps=False),
         "eager": dict(enable_cuda_graphs=False, overlap_steps=False)}
ENGINE = dict(max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=2048)


def replay_vs_eager_ms(graphs: Any, b: int) -> tuple[float, float]:
    """(ms per graph replay, ms per eager forward) at batch b, every row a padding row."""
    import torch

    graphs._fill_padding(b)
    graph = graphs.graphs[b]
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


def run_mode(mode: str, model: Any, tok: Any, reqs: list[tuple[list[int], int]], vocab: int) -> tuple[list[Row], list]:
    from astrai_serve import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM.from_model(model, tok, **ENGINE, **MODES[mode])
    build_s = time.perf_counter() - t
    engine = llm.engine
    sweep = [p[:16] for p, _ in reqs[:40]]          # 40 requests ending one per step: batch 40 .. 1
    llm.generate(sweep, [SamplingParams(max_tokens=i + 1, temperature=0.0, ignore_eos=True) for i in range(len(sweep))])
    llm.generate([p for p, _ in reqs[:8]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.reset_prefix_cache()
    steps, graph_steps = [0], [0]
    step, uses = engine.step, engine.runner.uses_graph

    def counting_uses(plan: Any) -> bool:
        used = uses(plan)
        graph_steps[0] += used
        return used

    def counting_step() -> Any:
        steps[0] += 1
        return step()

    engine.step, engine.runner.uses_graph = counting_step, counting_uses
    # Time the host spends waiting for sampled ids: near 100% = GPU-bound, low = the host is in the way.
    from astrai_serve.engine.sampler import PendingSample

    waited, result = [0.0], PendingSample.result

    def timed_result(self: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return result(self)
        finally:
            waited[0] += time.perf_counter() - t0

    PendingSample.result = timed_result
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for _, n in reqs]
    cpu0 = time.process_time()
    try:
        secs, res = common.timed(lambda: llm.generate([p for p, _ in reqs], params), "cuda")
    finally:
        PendingSample.result = result
    cpu = time.process_time() - cpu0
    tokens = sum(len(r.token_ids) for r in res)
    if tokens != sum(n for _, n in reqs):
        raise RuntimeError(f"{mode}: asked for {sum(n for _, n in reqs)} tokens with ignore_eos, got {tokens}")
    graphs = engine.runner.graphs
    note = (f"{len(reqs)} req, {steps[0]} steps ({graph_steps[0]} graph), {secs * 1e3 / steps[0]:.2f} ms/step, "
            f"host waits for the GPU {waited[0] / secs * 100:.0f}% of the time, host CPU {cpu / secs * 100:.0f}% busy, "
            f"engine built in {build_s:.1f} s")
    if graphs is not None:
        note += f" incl. capture of {len(graphs.sizes)} graphs in {graphs.capture_seconds:.1f} s"
    rows = [Row("W1", f"astrai {mode}", "output tok/s", tokens / secs, note=note,
                peers=[common.key("W1", "astrai eager", "output tok/s")] if mode != "eager" else [])]
    log(f"{mode}: {tokens / secs:,.0f} output tok/s in {secs:.1f} s; {note}")
    if graphs is not None:
        for b in (1, 64, 256):
            if b in graphs.graphs:
                replay, eager = replay_vs_eager_ms(graphs, b)
                rows.append(Row("step", f"decode forward b={b}", "graph replay ms", replay,
                                note=f"eager forward {eager:.2f} ms (context 1: fixed cost, no KV reads)"))
                log(f"b={b}: graph replay {replay:.3f} ms, eager forward {eager:.3f} ms")
    del engine.step, engine.runner.uses_graph   # drop the wrappers (a cycle that would keep the KV cache alive)
    return rows, [r.token_ids for r in res]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/engine_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", help="model preset, random bf16 weights (default qwen3-0.6b)")
    p.add_argument("--num-requests", type=int, default=256, help="W1 requests (default 256)")
    p.add_argument("--modes", default="graphs,eager,graphs-serial",
                   help=f"comma-separated, run in order: {', '.join(MODES)}")
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

    from astrai_train.model import ModelConfig, Transformer
    from astrai_train.tokenizer import Tokenizer

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    env = common.environment()
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(config)
    model = model.to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        common.synthetic_tokenizer(config.vocab_size, tmp)
        tok = Tokenizer.from_pretrained(tmp)
    reqs = serve.w1_requests(serve.Sizes(num_requests=args.num_requests), config.vocab_size)
    log(f"{args.preset} on {env.get('device')}: {len(reqs)} requests, {sum(n for _, n in reqs)} output tokens")
    rows: list[Row] = []
    outputs: dict[str, list] = {}
    for mode in modes:
        got, outputs[mode] = run_mode(mode, model, tok, reqs, config.vocab_size)
        rows += got
        gc.collect()                 # the engine's KV cache (most of the GPU) must go before the next one
        torch.cuda.empty_cache()
    for mode in modes[1:]:
        same = sum(a == b for a, b in zip(outputs[mode], outputs[modes[0]]))
        rows.append(Row("W1", f"astrai {mode}", f"greedy outputs equal to {modes[0]}", same,
                        note=f"of {len(reqs)} (random bf16 weights: near-ties may flip where batch shapes differ)"))
    common.report("bench/engine_step.py", rows, env, {"preset": args.preset, "engine": ENGINE, "modes": modes},
                  args.json or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
