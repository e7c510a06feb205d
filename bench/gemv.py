"""Batch-1 decode matmuls: cuBLAS (F.linear) against the Triton GEMV sweep, on qwen3-0.6b's shapes.

    python bench/gemv.py [--rows 1] [--json bench-gemv.json]

Each shape is timed as a decode step meets it: 28 back-to-back products over 28 different weight
matrices (so L2 never holds the weights) inside one CUDA graph, median of 5 replays; the LM head
once. Prints one table: microseconds per product and GB/s of weight read, cuBLAS against the best
Triton configuration, and the projected matmul time of a whole batch-1 step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYERS = 28
SHAPES = {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024), "down": (1024, 3072),
          "lm_head": (151936, 1024)}


def timed(fn, copies: int) -> float:
    """Median microseconds per call of fn(i) for i in range(copies), replayed from one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gemv.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1, help="rows of x (the decode batch), 1-4 (default 1)")
    p.add_argument("--json", default="bench-gemv.json", help="where to write the JSON results ('' for none)")
    args = p.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import common
    from astrai_serve.kernels.triton_gemv import candidate_configs, gemv

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    configs = candidate_configs()
    rows = []
    totals = {"cublas": 0.0, "triton": 0.0}
    for name, (n, k) in SHAPES.items():
        copies = 1 if name == "lm_head" else LAYERS
        ws = [torch.randn(n, k, device=dev, dtype=dt) for _ in range(copies)]
        x = torch.randn(args.rows, k, device=dev, dtype=dt)
        want = F.linear(x, ws[0]).float()
        cublas = timed(lambda i: F.linear(x, ws[i]), copies)
        best, best_cfg = float("inf"), None
        for cfg in configs:
            try:
                err = float((gemv(x, ws[0], cfg).float() - want).norm() / want.norm())
                if err > 1e-2:
                    print(f"{name} {cfg}: wrong (rel err {err:.2e})", flush=True)
                    continue
                us = timed(lambda i, cfg=cfg: gemv(x, ws[i], cfg), copies)
            except Exception as exc:  # a config the compiler refuses (registers, shared memory)
                print(f"{name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            if us < best:
                best, best_cfg = us, cfg
        gb = n * k * 2 / 1e9
        rows.append(dict(shape=name, n=n, k=k, cublas_us=cublas, cublas_gbps=gb / cublas * 1e6,
                         triton_us=best, triton_gbps=gb / best * 1e6, speedup=cublas / best,
                         config=None if best_cfg is None else best_cfg.__dict__))
        totals["cublas"] += cublas * copies
        totals["triton"] += min(best, cublas) * copies
        del ws
    dev_name = torch.cuda.get_device_name()
    print(f"\nbatch-{args.rows} decode matmuls, qwen3-0.6b shapes, bf16, {dev_name}")
    print(f"{'matrix':9} {'N x K':>14} {'cuBLAS us':>10} {'GB/s':>7} {'Triton us':>10} {'GB/s':>7} {'speedup':>8}  best config")
    for r in rows:
        print(f"{r['shape']:9} {r['n']:>7}x{r['k']:<6} {r['cublas_us']:10.2f} {r['cublas_gbps']:7.0f} "
              f"{r['triton_us']:10.2f} {r['triton_gbps']:7.0f} {r['speedup']:7.2f}x  {r['config']}")
    print(f"a whole step's matmuls: cuBLAS {totals['cublas']:.0f} us, best of both per shape {totals['triton']:.0f} us")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "bench/gemv.py", "environment": common.environment(),
                                               "rows_of_x": args.rows, "rows": rows, "step_us": totals}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
