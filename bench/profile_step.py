"""Where a serving step's time goes, on the GPU: host phases, GPU busy time and the top kernels.

    python bench/profile_step.py [--preset qwen3-0.6b] [--workloads W3,W1,W2] [--compile-decode]

For each workload of bench/serve.py (same requests, random bf16 weights, in-process `LLM`):
the host milliseconds per step by engine phase and the GPU busy time per step (bench/engine_step.py's
Probe), then a torch.profiler trace of a few steps summarised as the kernels with the most GPU
time (count per step, microseconds per step). W2 also splits its steps into pure decode (graph)
and prefill/mixed ones. Prints plain text: this is a diagnostic, not a benchmark table.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import serve  # noqa: E402
from engine_step import Probe  # noqa: E402


def top_kernels(prof: Any, steps: int, n: int = 32) -> str:
    """The n kernels with the most device time, per step (name, count, µs)."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for evt in prof.events():
        if evt.device_type.name == "CUDA" and evt.device_time > 0:
            total[evt.name] += evt.device_time
            count[evt.name] += 1
    busy = sum(total.values()) / steps
    lines = [f"  GPU kernel time {busy:.0f} us/step over {sum(count.values()) / steps:.0f} kernels/step"]
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"  {us / steps:9.1f} us  {count[name] / steps:6.1f}x  {name[:110]}")
    return "\n".join(lines)


def profiled(llm: Any, prompts: list[list[int]], params: list[Any], label: str, trace_steps: int) -> None:
    import torch

    engine = llm.engine
    engine.reset_prefix_cache()
    with Probe() as probe:
        t = time.perf_counter()
        llm.generate(prompts, params)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
    n = probe.steps
    host = ", ".join(f"{k} {v * 1e3 / n:.3f}" for k, v in probe.host.items())
    print(f"{label}: {secs:.3f} s, {n} steps ({probe.graph_steps} graph), {secs * 1e3 / n:.3f} ms/step, "
          f"GPU busy {probe.gpu_ms_per_step():.3f} ms/step\n  host ms/step: {host}", flush=True)
    # A trace of steps from the middle of the run: add the requests, step past the prefill, record.
    engine.reset_prefix_cache()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"prof-{i}", p, sp)
    for _ in range(max(3, n // 3)):
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(trace_steps):
            engine.step()
        torch.cuda.synchronize()
    print(top_kernels(prof, trace_steps), flush=True)
    while engine.has_unfinished_requests():
        engine.step()


def replay_host_cost(llm: Any) -> None:
    """Host and GPU time of bare graph replays (every row padding, context 1) at a few sizes."""
    import torch

    graphs = llm.engine.runner.graphs
    for b in (1, 64, 256):
        if (b, False) not in graphs.graphs:
            continue
        graphs._fill_padding(b)
        graph = graphs.graphs[b, False]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        host = (time.perf_counter() - t) / 50 * 1e3
        end.synchronize()
        print(f"graph b={b}: host {host:.3f} ms/replay (launch), GPU {start.elapsed_time(end) / 50:.3f} ms/replay",
              flush=True)


def host_profile(llm: Any, prompts: list[list[int]], params: list[Any], label: str) -> None:
    """cProfile of one whole run: the host functions with the most own time."""
    import cProfile
    import pstats

    llm.engine.reset_prefix_cache()
    prof = cProfile.Profile()
    prof.enable()
    llm.generate(prompts, params)
    prof.disable()
    print(f"{label}: host functions by own time", flush=True)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def w2_split(llm: Any, prompts: list[list[int]], params: list[Any]) -> None:
    """W2's GPU time split between graph (pure decode) steps and eager (prefill/mixed) steps."""
    import torch

    engine, runner = llm.engine, llm.engine.runner
    engine.reset_prefix_cache()
    times: dict[bool, list[float]] = {True: [], False: []}
    execute = type(runner).execute

    def timed(self: Any, plan: Any, *args: Any) -> Any:
        graph = self.uses_graph(plan)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = execute(self, plan, *args)
        torch.cuda.synchronize()
        times[graph].append(time.perf_counter() - t)
        return out

    type(runner).execute = timed
    try:
        t = time.perf_counter()
        llm.generate(prompts, params)
        secs = time.perf_counter() - t
    finally:
        type(runner).execute = execute
    print(f"W2 (synchronised, for the split): {secs:.3f} s; decode graph steps {len(times[True])} = "
          f"{sum(times[True]):.3f} s; prefill/mixed steps {len(times[False])} = {sum(times[False]):.3f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/profile_step.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", help="model preset, random bf16 weights (default qwen3-0.6b)")
    p.add_argument("--workloads", default="W3,W1,W2", help="comma-separated, in order, repeats allowed: W1, W2, W3, R (GRPO rollouts), replay, host-W1, host-W2, host-W3, host-R (default W3,W1,W2)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the graphed decode forward (default on, as in the serve bench)")
    p.add_argument("--max-model-len", type=int, default=2048, help="engine max_model_len (default 2048, as bench/serve.py)")
    p.add_argument("--trace-steps", type=int, default=10, help="steps recorded by the profiler (default 10)")
    p.add_argument("--unfused", action="store_true",
                   help="keep q/k/v and gate/up apart, as GRPO's rollout engine runs the training module")
    p.add_argument("--decode-gemv", action=argparse.BooleanOptionalAction, default=None,
                   help="graphed decodes of 1-4 sequences through the Triton GEMV (default: the engine's, on)")
    args = p.parse_args(argv)
    import torch

    from astrai_serve import LLM, SamplingParams

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    config, model, tok = common.random_gpu_model(args.preset, fuse=not args.unfused)
    s = serve.FULL
    t = time.perf_counter()
    llm = LLM.from_model(model, tok, max_num_seqs=256, max_num_batched_tokens=16384, max_model_len=args.max_model_len,
                         compile_decode=args.compile_decode, decode_gemv=args.decode_gemv)
    print(f"engine built in {time.perf_counter() - t:.1f} s; graphs {llm.engine.runner.graphs.sizes}", flush=True)
    greedy = dict(temperature=0.0, ignore_eos=True)
    reqs = serve.w1_requests(s, config.vocab_size)
    llm.generate([pr[:16] for pr, _ in reqs[:40]], [SamplingParams(max_tokens=i + 1, **greedy) for i in range(40)])
    for w in args.workloads.split(","):
        if w == "replay":
            replay_host_cost(llm)
        elif w == "W3":
            prompt = serve.w3_prompt(s, config.vocab_size)
            profiled(llm, [prompt], [SamplingParams(max_tokens=s.w3_output, **greedy)], "W3 batch 1", args.trace_steps)
        elif w == "W1":
            profiled(llm, [pr for pr, _ in reqs], [SamplingParams(max_tokens=n, **greedy) for _, n in reqs],
                     "W1", args.trace_steps)
        elif w == "W2":
            prompts = serve.w2_prompts(s, config.vocab_size)
            params = [SamplingParams(max_tokens=s.w2_output, **greedy)] * len(prompts)
            profiled(llm, prompts, params, "W2 cache on", args.trace_steps)
            w2_split(llm, prompts, params)
        elif w in ("R", "host-R"):
            # bench/train_rollouts.py's batch: 32 prompts of 64-256 tokens, 8 seeded samples each.
            rng = random.Random(3)
            prompts = [[rng.randrange(5, config.vocab_size) for _ in range(rng.randint(64, 256))] for _ in range(32)]
            params = [SamplingParams(n=8, temperature=1.0, max_tokens=256, seed=i, ignore_eos=True)
                      for i in range(len(prompts))]
            if w == "R":
                profiled(llm, prompts, params, "R rollouts", args.trace_steps)
            else:
                host_profile(llm, prompts, params, "R")
        elif w == "host-W2":
            prompts = serve.w2_prompts(s, config.vocab_size)
            host_profile(llm, prompts, [SamplingParams(max_tokens=s.w2_output, **greedy)] * len(prompts), "W2")
        elif w == "host-W3":
            host_profile(llm, [serve.w3_prompt(s, config.vocab_size)],
                         [SamplingParams(max_tokens=s.w3_output, **greedy)], "W3")
        elif w == "host-W1":
            host_profile(llm, [pr for pr, _ in reqs], [SamplingParams(max_tokens=n, **greedy) for _, n in reqs], "W1")
        else:
            p.error(f"--workloads: unknown workload {w!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
