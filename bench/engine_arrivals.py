"""W4 without the daemon: W1's requests added to an in-process engine at a fixed rate.

    python bench/engine_arrivals.py [--rate 64] [--compile-decode]      # CUDA, qwen3-0.6b bf16
    python bench/engine_arrivals.py --tiny                               # CPU smoke run

bench/serve.py's W4 sends the same requests through the REST facade, the gRPC core and the
engine process. This runs the engine alone, stepping it on one thread and adding each request
when its time comes, so comparing the two tells the engine's share of W4's throughput and TTFT
from the serving path's. Prints (diagnostic, not a benchmark table): output tokens/s against the
same requests all added at t = 0, the engine-side TTFT (request added -> first token out of
`step()`) by arrival quarter, and step times split by what the step computed (pure decode, or a
prefill beside decodes).
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


def run(engine: Any, requests: list[tuple[list[int], int]], rate: float | None) -> dict[str, Any]:
    """Add `requests` (prompt ids, max tokens) at `rate` per second (None: all at once) and step
    the engine until every one is finished. Returns the summary printed by `report`."""
    from astrai_serve import SamplingParams

    engine.reset_prefix_cache()
    runner = engine.runner
    execute = runner.execute
    kinds: list[bool] = []                       # per launched step: True = pure decode
    launched: list[int] = []                     # per launched step: tokens computed

    def recording(plan: Any, *args: Any) -> Any:
        kinds.append(all(c.num_tokens == 1 for c in plan.chunks))
        launched.append(sum(c.num_tokens for c in plan.chunks))
        return execute(plan, *args)

    runner.execute = recording
    pauses: list[float] = []                     # ms of each full (generation 2) collection
    began = [0.0]

    def timing_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                pauses.append(1e3 * (time.perf_counter() - began[0]))

    gc.callbacks.append(timing_gc)
    start = time.perf_counter()
    due = [start + i / rate for i in range(len(requests))] if rate else [start] * len(requests)
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    step_ms: list[float] = []
    slow: list[tuple[float, int]] = []           # (ms, tokens launched during that step() call)
    tokens, nxt = 0, 0
    try:
        while nxt < len(requests) or engine.has_unfinished_requests():
            now = time.perf_counter()
            while nxt < len(requests) and due[nxt] <= now:
                prompt, n = requests[nxt]
                rid = f"a{nxt}"
                engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
                added[rid] = now
                nxt += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, due[nxt] - time.perf_counter()))
                continue
            t, before = time.perf_counter(), len(launched)
            outputs = engine.step()
            done = time.perf_counter()
            step_ms.append(1e3 * (done - t))
            slow.append((step_ms[-1], sum(launched[before:])))
            for out in outputs:
                first.setdefault(out.request_id, done)
                if out.finished:
                    tokens += len(out.token_ids)
    finally:
        runner.execute = execute
        gc.callbacks.remove(timing_gc)
    secs = time.perf_counter() - start
    by_arrival = sorted(added, key=added.get)
    q = max(1, len(by_arrival) // 4)
    ttft = [[1e3 * (first[r] - added[r]) for r in by_arrival[i:i + q]] for i in range(0, len(by_arrival), q)][:4]
    return {"secs": secs, "tokens": tokens, "tps": tokens / secs, "steps": len(step_ms),
            "ttft_quarters": [common.median(t) for t in ttft],
            "ttft_p99": common.percentile([x for t in ttft for x in t], 99),
            "step_ms": (common.median(step_ms), common.percentile(step_ms, 99)),
            "decode_steps": sum(kinds), "mixed_steps": len(kinds) - sum(kinds),
            "slowest": sorted(slow, reverse=True)[:6], "gc_pauses": pauses}


def log_triton_compiles() -> None:
    """Wrap Triton's JIT compile to print what compiles when: a compile is 0.3-2 s of a step."""
    from triton.runtime.jit import JITFunction

    compile_one, t0 = JITFunction._do_compile, time.perf_counter()

    def logged(self: Any, key: Any, signature: Any, device: Any, constexprs: Any, *args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        out = compile_one(self, key, signature, device, constexprs, *args, **kw)
        spec = ",".join(f"{k[0] if isinstance(k, tuple) else k}={v}" for k, v in constexprs.items())[:300]
        print(f"[compile {start - t0:7.2f}s] {self.fn.__name__} {time.perf_counter() - start:.2f}s "
              f"key={str(key)[:400]} {spec}", flush=True)
        return out

    JITFunction._do_compile = logged


def report(label: str, r: dict[str, Any]) -> None:
    quarters = ", ".join(f"{t:.0f}" for t in r["ttft_quarters"])
    print(f"{label}: {r['tokens']} tokens in {r['secs']:.2f} s = {r['tps']:,.0f} tok/s; "
          f"TTFT p50 by arrival quarter {quarters} ms (p99 {r['ttft_p99']:.0f}); "
          f"{r['steps']} steps, step p50/p99 {r['step_ms'][0]:.1f}/{r['step_ms'][1]:.1f} ms; "
          f"launched {r['decode_steps']} pure-decode and {r['mixed_steps']} prefill/mixed steps; "
          f"{len(r['gc_pauses'])} full GC pauses (longest {max(r['gc_pauses'], default=0):.0f} ms); slowest "
          + ", ".join(f"{ms:.0f} ms ({n} tokens launched)" for ms, n in r["slowest"]), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/engine_arrivals.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=64.0, help="requests per second (default 64, as W4)")
    p.add_argument("--preset", default="qwen3-0.6b", help="model preset, random bf16 weights (CUDA)")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the graphed forward (default on, as bench/serve.py)")
    p.add_argument("--tiny", action="store_true", help="a toy model and 8 requests on the CPU (smoke run)")
    p.add_argument("--gc-freeze", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze what is alive after startup out of the garbage collector's sight, as "
                        "`astrai serve`'s engine process does (default on; --no-gc-freeze shows the pauses)")
    p.add_argument("--log-compiles", action="store_true",
                   help="print every Triton JIT compile (kernel, seconds, specialization) as it happens; "
                        "with a fresh TRITON_CACHE_DIR this shows which kernels compile mid-serving")
    args = p.parse_args(argv)
    if args.log_compiles:
        log_triton_compiles()
    if args.rate <= 0:
        p.error(f"--rate {args.rate}: must be > 0")
    import torch

    from astrai_serve import LLMEngine

    if args.tiny:
        from astrai_train.model import ModelConfig, Transformer

        config = ModelConfig.from_preset("tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128,
                                         vocab_size=512)
        torch.manual_seed(0)
        model = Transformer(config).eval()
        sizes = serve.TINY
        engine = LLMEngine.from_model(model, None, max_num_seqs=8, max_num_batched_tokens=256)
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (or --tiny)")
        config, model, _ = common.random_gpu_model(args.preset)
        sizes = serve.FULL
        engine = LLMEngine.from_model(model, None, max_num_seqs=256, max_num_batched_tokens=16384,
                                      max_model_len=2048, compile_decode=args.compile_decode)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()     # as the daemon's engine process does once its engine is built
    if args.log_compiles:
        print("[engine started: compiles below this line happened while serving]", flush=True)
    requests = serve.w1_requests(sizes, config.vocab_size)
    run(engine, [(pr[:16], 4) for pr, _ in requests[:8]], None)          # warm-up: kernels, allocator
    report("all at t = 0 (W1)", run(engine, requests, None))
    report(f"{args.rate:g} req/s (W4's arrivals)", run(engine, requests, args.rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
