"""Batch-1 decode matmuls: cuBLAS (F.linear) against the Triton GEMV sweep, on qwen3-0.6b's shapes.

    python bench/gemv.py [--rows 1] [--chain] [--json bench-gemv.json]

Each shape is timed as a decode step meets it: 28 back-to-back products over 28 different weight
matrices (so L2 never holds the weights) inside one CUDA graph, median of 5 replays; the LM head
once. Prints one table: microseconds per product and GB/s of weight read, cuBLAS against the best
Triton configuration, and the projected matmul time of a whole batch-1 step.

--chain instead times a layer's four products as a step chains them, each reading the one before's
output: qkv, o (on half of qkv's output, attention's width), gate_up, and down from silu(gate) * up,
over 28 layers of their own weights, in one CUDA graph (median of 5 replays). Rows: cuBLAS with
torch's F.silu(g) * u (the peer), the Triton GEMV (the engine's configs, decode_matmul.gemv_config)
with that separate activation or with it computed in the down projection's prologue, each with
programmatic dependent launch off and on (on needs a Hopper GPU). One table, microseconds per
chain and GB/s of weight read.
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
    p.add_argument("--chain", action="store_true", help="time the chain of a layer's four products x 28 layers")
    p.add_argument("--json", default=None, help="where to write the JSON results (default bench-gemv.json, "
                   "bench-gemv-chain.json with --chain; '' for none)")
    args = p.parse_args(argv)
    if args.json is None:
        args.json = "bench-gemv-chain.json" if args.chain else "bench-gemv.json"
    if args.chain:
        return chain(p, args)
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


CHAIN = ("qkv", "o", "gate_up", "down")
CHECK_LAYERS = 3


def chain(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    import common
    from astrai_serve.kernels.decode_matmul import gemv_config
    from astrai_serve.kernels.triton_gemv import GemvConfig, gemv, gemv_silu_mul, pdl_supported

    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    dev, dt = "cuda", torch.bfloat16
    # Weights scaled by 1/sqrt(K). silu(gate) * up is quadratic in x, so without norms and residuals
    # a chain of 28 such layers ends at zero or inf: the timings do not care, the checks against
    # cuBLAS and between launches use the first CHECK_LAYERS layers, where the values are still O(1).
    layers = [{name: torch.randn(SHAPES[name], device=dev, dtype=dt) * SHAPES[name][1] ** -0.5 for name in CHAIN}
              for _ in range(LAYERS)]
    x0 = torch.randn(args.rows, SHAPES["qkv"][1], device=dev, dtype=dt)
    o_in = SHAPES["o"][1]

    def cublas_silu(gate_up, w):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w)

    def run(linear, silu_linear, layers=layers):
        h = x0
        for layer in layers:
            qkv = linear(h, layer["qkv"])
            o = linear(qkv[:, :o_in], layer["o"])   # attention's output is as wide as q
            h = silu_linear(linear(o, layer["gate_up"]), layer["down"])
        return h

    def triton(prologue: bool, pdl: bool):
        def linear(x, w):
            return gemv(x, w, GemvConfig(*gemv_config(*w.shape)), pdl=pdl)

        def silu_linear(gate_up, w):
            if prologue:
                return gemv_silu_mul(gate_up, w, GemvConfig(*gemv_config(*w.shape)), pdl=pdl)
            gate, up = gate_up.chunk(2, dim=-1)
            return linear(F.silu(gate) * up, w)
        return linear, silu_linear

    variants = {"cuBLAS + F.silu(g)*u": (F.linear, cublas_silu)}
    for prologue in (False, True):
        for pdl in (False, True):
            name = ("Triton, silu prologue" if prologue else "Triton + F.silu(g)*u") + (", PDL" if pdl else "")
            variants[name] = triton(prologue, pdl) if pdl_supported(dev) or not pdl else None
    gb = LAYERS * sum(n * k for n, k in (SHAPES[name] for name in CHAIN)) * 2 / 1e9
    want = run(*variants["cuBLAS + F.silu(g)*u"], layers=layers[:CHECK_LAYERS]).float()
    outs, rows = {}, []
    for name, fns in variants.items():
        if fns is None:
            rows.append(dict(variant=name, us=None, gbps=None, speedup=None, rel_err_vs_cublas=None,
                             note="PDL needs compiled Triton on a GPU of compute capability 9.0+"))
            continue
        outs[name] = run(*fns, layers=layers[:CHECK_LAYERS])
        us = timed(lambda i, fns=fns: run(*fns), 1)
        err = float((outs[name].float() - want).norm() / want.norm())
        rows.append(dict(variant=name, us=us, gbps=gb / us * 1e6, rel_err_vs_cublas=err, note=""))
    base = rows[0]["us"]
    for r in rows:
        r["speedup"] = None if r["us"] is None else base / r["us"]
    for name in [n for n in outs if n.endswith(", PDL")]:
        # the same kernels and math, only launched differently: the same bits
        assert torch.equal(outs[name], outs[name[:-len(", PDL")]]), f"{name}: differs from the launch without PDL"
    print(f"\nbatch-{args.rows} decode chain: qkv, o, gate_up, silu*up + down x {LAYERS} layers in one CUDA graph, "
          f"qwen3-0.6b shapes, bf16, {torch.cuda.get_device_name()}; {gb * 1e3:.0f} MB of weights; "
          f"rel err: against cuBLAS after {CHECK_LAYERS} layers")
    print(f"{'variant':30} {'us/chain':>9} {'GB/s':>7} {'vs cuBLAS':>10} {'rel err':>9}  note")
    for r in rows:
        if r["us"] is None:
            print(f"{r['variant']:30} {'-':>9} {'-':>7} {'-':>10} {'-':>9}  {r['note']}")
            continue
        print(f"{r['variant']:30} {r['us']:9.1f} {r['gbps']:7.0f} {r['speedup']:9.2f}x "
              f"{r['rel_err_vs_cublas']:9.1e}  {r['note']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "bench/gemv.py --chain", "environment": common.environment(),
                                               "rows_of_x": args.rows, "weights_gb": gb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
