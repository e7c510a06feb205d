"""Delivery overhead of the daemon (issue 7, W4): the same concurrent streamed requests through
the engine alone, through gRPC `Generate` streams, and through the OpenAI REST facade.

    python bench/delivery.py [--requests 64] [--max-tokens 128] [--systems offline,grpc,...]
                             [--repeats 3] [--slow-ms 2] [--json PATH] [--tiny] [--skip-peer]

offline      `LLM.generate` in this process: the engine's own rate, the peer of every other row
grpc         `astrai serve --no-http` as a subprocess (the engine in its own child process), one
             grpc.aio stream per request
rest         `astrai serve` (the facade and the engine in their own processes), the `openai`
             AsyncOpenAI client streaming completions (token-id prompts, `ignore_eos`)
rest-thread  the same with `--http-in-process`: the facade on a thread of the daemon's process
rest-engine-thread  the same as rest with `--engine-in-process`: the engine on a thread of the
             daemon's process, sharing a GIL with the gRPC core (the layout before the engine process)
grpc-slow    the gRPC streams read by a consumer slower than the engine: it blocks --slow-ms per
             message (all streams share one thread, as a busy facade does) and uses the facade's
             small receive window. One message per token makes it the bottleneck; a server that
             coalesces the backlog keeps the rate near the engine's

Every request is sent at once (all are running together, as in W1), with `ignore_eos`, so each
makes exactly --max-tokens tokens. output tok/s = tokens / (last response end - first send).
`msgs/request` counts the gRPC messages (or SSE chunks with text) a client received per request:
max-tokens means one per token, fewer means the server coalesced a lagging stream's backlog.
CPU time per output token, read from /proc (so it holds on a busy machine, where rates do not):
`core` is the daemon's main thread (the gRPC core's event loop), `daemon` the whole daemon process
(with `--engine-in-process` the engine too, whose GIL the core's delivery work then shares),
`engine` the engine's child process, `facade` the facade's child process.

The model is tiny (random weights, float32, one thread), so a run takes seconds. On a CPU its
step (the torch reference attention) still costs far more per token than delivery does, unlike on
a GPU, and the clients share the cores with the daemon: read the ratios and the CPU time per
token, not the absolute rates. On an H200 the engine makes ~37,000 tokens/s with 256 requests, so
with the engine on a thread delivery has well under 30 us of the daemon's GIL per token; `core`
above that means lag there.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib
import multiprocessing
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Row, key, log  # noqa: E402

SYSTEMS = ("offline", "grpc", "rest", "rest-thread", "rest-engine-thread", "grpc-slow")
# The REST facade's gRPC channel options (core_client.CHANNEL_OPTIONS), spelled out so that this
# file also measures a checkout that predates them.
FACADE_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
FIRST_ID = 5  # ids below are special tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/delivery.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--requests", type=int, default=None, help="concurrent requests (default 64; 8 with --tiny)")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 128; 16 with --tiny)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per request (default 16)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--repeats", type=int, default=None, help="runs per system; the table shows the median (default 3; 1 with --tiny)")
    p.add_argument("--client-procs", type=int, default=1, help="client processes for grpc/rest (default 1)")
    p.add_argument("--slow-ms", type=float, default=2.0, help="grpc-slow: the consumer's blocking cost per message (default 2)")
    p.add_argument("--dim", type=int, default=64, help="model width (default 64)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke run")
    p.add_argument("--skip-peer", action="store_true", help="leave out the offline row")
    p.add_argument("--json", default="", help="also write the rows here (default: none)")
    args = p.parse_args(argv)
    for name, full, tiny in (("requests", 64, 8), ("max_tokens", 128, 16), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    bad = sorted(set(args.systems.split(",")) - set(SYSTEMS))
    if bad:
        p.error(f"--systems: unknown system {bad[0]!r} (choose from {','.join(SYSTEMS)})")
    if args.skip_peer:
        args.systems = ",".join(x for x in args.systems.split(",") if x != "offline")
    for name in ("requests", "max_tokens", "prompt_len", "repeats", "client_procs", "dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    return args


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    per_seq_pages = (args.prompt_len + args.max_tokens) // 16 + 2
    return {"max_num_seqs": args.requests, "max_num_batched_tokens": max(2048, args.requests * args.prompt_len),
            "num_pages": args.requests * per_seq_pages + 64, "max_model_len": 1024, "dtype": "float32"}


def prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(FIRST_ID, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]


# ---- clients (each in its own process) -------------------------------------------------------

async def _grpc_one(stub: Any, pb: Any, prompt: list[int], max_tokens: int, slow_s: float) -> dict[str, Any]:
    start = time.time()
    params = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    times, tokens = [], 0
    async for r in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), params=params)):
        if r.token_ids:
            times.append(time.time())
            tokens += len(r.token_ids)
        if slow_s:
            time.sleep(slow_s)  # blocking on purpose: a consumer's CPU time is not shared between streams
    return {"start": start, "end": time.time(), "tokens": tokens, "msgs": len(times), "times": times}


async def _rest_one(client: Any, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    start = time.time()
    times, tokens = [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.time())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"start": start, "end": time.time(), "tokens": tokens, "msgs": len(times), "times": times}


def client_worker(kind: str, target: str, model: str, jobs: list[list[int]], max_tokens: int,
                  slow_s: float = 0.0) -> dict[str, Any]:
    """One client process: all of its requests at once; returns per-request results and CPU use."""

    async def main() -> list[dict[str, Any]]:
        if kind == "grpc":
            import grpc

            from astrai_serve.proto import generate_pb2 as pb
            from astrai_serve.proto import generate_pb2_grpc as pb_grpc

            async with grpc.aio.insecure_channel(target, options=FACADE_WINDOW if slow_s else None) as channel:
                stub = pb_grpc.GenerationServiceStub(channel)
                return await asyncio.gather(*(_grpc_one(stub, pb, p, max_tokens, slow_s) for p in jobs))
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=f"{target}/v1", api_key="bench", max_retries=0, timeout=600)
        try:
            return await asyncio.gather(*(_rest_one(client, model, p, max_tokens) for p in jobs))
        finally:
            await client.close()

    cpu, wall = time.process_time(), time.time()
    results = asyncio.run(main())
    return {"results": results, "cpu_busy": (time.process_time() - cpu) / max(time.time() - wall, 1e-9)}


def run_clients(kind: str, target: str, model: str, jobs: list[list[int]], max_tokens: int, procs: int,
                slow_s: float = 0.0) -> dict[str, Any]:
    client_worker(kind, target, model, jobs[:4], 4)  # warm-up: connections, first-call costs
    # Spawned processes find the worker by module name: `delivery`, however this file was loaded.
    worker = importlib.import_module("delivery").client_worker
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        # Start the processes (imports) before the clock runs: one trivial call each.
        list(pool.map(time.sleep, [0.01] * procs))
        futures = [pool.submit(worker, kind, target, model, jobs[k::procs], max_tokens, slow_s)
                   for k in range(procs)]
        outs = [f.result() for f in futures]
    results = [r for o in outs for r in o["results"]]
    return summarize(results, max(o["cpu_busy"] for o in outs))


def summarize(results: list[dict[str, Any]], cpu_busy: float | None = None) -> dict[str, Any]:
    gaps = [1e3 * (r["times"][-1] - r["times"][0]) / (r["tokens"] - 1)
            for r in results if r["tokens"] > 1 and len(r["times"]) > 1]
    return {"tps": sum(r["tokens"] for r in results) / (max(r["end"] for r in results) - min(r["start"] for r in results)),
            "tokens": sum(r["tokens"] for r in results), "msgs": sum(r["msgs"] for r in results) / len(results),
            "tpot": common.percentile(gaps, 50) if gaps else None, "cpu_busy": cpu_busy}


# ---- systems ---------------------------------------------------------------------------------

def run_offline(model_dir: Path, engine: dict[str, Any], jobs: list[list[int]], max_tokens: int) -> dict[str, Any]:
    from astrai_serve import LLM, SamplingParams

    llm = LLM(model_dir, **engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(jobs[:4], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.time()
    outs = llm.generate(jobs, params)
    end = time.time()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tps": tokens / (end - start), "tokens": tokens, "msgs": None, "tpot": None, "cpu_busy": None}


def run_system(system: str, args: argparse.Namespace, model_dir: Path, jobs: list[list[int]],
               env: dict[str, str]) -> list[dict[str, Any]]:
    import serve_online

    engine = engine_settings(args)
    if system == "offline":
        return [run_offline(model_dir, engine, jobs, args.max_tokens) for _ in range(args.repeats)]
    flags = {"grpc": ["--no-http"], "grpc-slow": ["--no-http"], "rest": [], "rest-thread": ["--http-in-process"],
             "rest-engine-thread": ["--engine-in-process"]}[system]
    daemon = serve_online.Daemon(str(model_dir), engine, env, [*flags, "--served-model-name", "bench"]).wait_ready()
    try:
        kind, target = ("grpc", daemon.ready["grpc"]) if "grpc" in system else ("rest", daemon.ready["http"])
        slow_s = args.slow_ms / 1e3 if system == "grpc-slow" else 0.0
        runs = []
        for _ in range(args.repeats):
            before = daemon.cpu()
            run = run_clients(kind, target, "bench", jobs, args.max_tokens, args.client_procs, slow_s)
            after = daemon.cpu()
            run["cpu_us"] = {k: 1e6 * (after[k] - before[k]) / run["tokens"] for k in after}
            runs.append(run)
        return runs
    finally:
        daemon.stop()


def _main(args: argparse.Namespace) -> int:
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # a toy model gains nothing from threads; the daemon gets the same
    env = {"OMP_NUM_THREADS": "1"}
    workdir = Path(tempfile.mkdtemp(prefix="astrai-bench-delivery-"))
    try:
        model_dir = common.random_model_dir("tiny", workdir / "model", dtype="float32", dim=args.dim, n_layers=2,
                                            n_heads=2, n_kv_heads=1, head_dim=args.dim // 2, dim_ffn=2 * args.dim)
        jobs = prompts(args, vocab=4096)
        rows: list[Row] = []
        for system in args.systems.split(","):
            log(f"{system}: {args.requests} requests x {args.max_tokens} tokens, {args.repeats} run(s)")
            try:
                runs = run_system(system, args, model_dir, jobs, env)
            except Exception as exc:
                rows.append(Row("delivery", system, "output tok/s", None, note=f"failed: {type(exc).__name__}: {exc}"))
                continue
            best = sorted(runs, key=lambda r: r["tps"])[len(runs) // 2]  # the median run
            runs_note = ", ".join(f"{r['tps']:,.0f}" for r in runs)
            note = f"runs {runs_note}"
            if best["msgs"] is not None:
                note += f"; {best['msgs']:.1f} msgs/request; TPOT p50 {best['tpot']:.2f} ms; client CPU {100 * best['cpu_busy']:.0f}%"
                note += "; CPU us/token " + " ".join(f"{k} {v:.0f}" for k, v in best["cpu_us"].items())
            peers = [] if system == "offline" else [key("delivery", "offline", "output tok/s")]
            rows.append(Row("delivery", system, "output tok/s", best["tps"], peers=peers, note=note))
        settings = {"requests": args.requests, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
                    "repeats": args.repeats, "client_procs": args.client_procs, "dim": args.dim,
                    "engine": engine_settings(args)}
        common.report("bench/delivery.py", rows, common.environment(), settings, args.json or None)
    finally:
        torch.set_num_threads(threads_before)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return common.cli_main("bench/delivery.py", parse_args, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
