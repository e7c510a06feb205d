"""Paged-attention kernels on one CUDA GPU: the GPU tests, then decode and prefill timings in one table.

    python3 bench/paged_attention.py                          # tests + table
    python3 bench/paged_attention.py --no-tests --json k.json  # table only, full numbers to k.json

Decode rows time one layer's attention for `batch` sequences of `ctx` cached tokens each (one
query per sequence, page size 16, bf16, pages scattered at random) four ways: the Triton kernel
launched eagerly, the same captured in a CUDA graph (how the engine's decode step runs it), the
torch reference, and dense SDPA over contiguous K/V (the peer: no paging at all). GB/s counts
the K/V bytes each call must read once; "%bw" is that over the device-to-device copy bandwidth
measured at the start. Eager timings flush L2 between runs (triton's do_bench); graph replays do
not, so small cases (B=1, ctx 512: ~2 MB of K/V) are L2-resident there. The `store` section
times one layer's write of new K/V into the cache (`--sections store`).
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from astrai_serve.kernels import reference  # noqa: E402
from astrai_serve.kernels.triton_attention import TileConfig, paged_attention, pick_config  # noqa: E402

# name: (query heads, kv heads, key dim, value dim, value stored inside the key)
SHAPES = {
    "qwen3-0.6b": (16, 8, 128, 128, False),
    "1b": (24, 4, 64, 64, False),
    "mla-v2lite": (16, 1, 576, 512, True),
}
PAGE = 16
DT = torch.bfloat16


def copy_bandwidth_gbs() -> float:
    x = torch.randn(2 ** 29, device="cuda", dtype=DT)        # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def paged_inputs(ctx_lens: list[int], q_lens: list[int], shape: tuple) -> tuple:
    """Random paged inputs made on the GPU; pages of all sequences shuffled through one pool."""
    n_heads, n_kv, k_dim, v_dim, value_in_key = shape
    pages = [math.ceil(c / PAGE) for c in ctx_lens]
    n_pages = sum(pages) + 1
    k_cache = torch.randn(n_pages, PAGE, n_kv, k_dim, device="cuda", dtype=DT)
    v_cache = None if value_in_key else torch.randn(n_pages, PAGE, n_kv, v_dim, device="cuda", dtype=DT)
    perm = torch.randperm(n_pages, device="cuda").int()
    table = torch.zeros(len(ctx_lens), max(pages), dtype=torch.int32, device="cuda")
    at = 0
    for s, n in enumerate(pages):
        table[s, :n] = perm[at:at + n]
        at += n
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(cu[-1]), n_heads, k_dim, device="cuda", dtype=DT)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device="cuda")
    return (q, k_cache, v_cache, table, cu.cuda(), ctx, k_dim ** -0.5, v_dim)


def kv_bytes(ctx_lens: list[int], shape: tuple) -> int:
    _, n_kv, k_dim, v_dim, value_in_key = shape
    return sum(ctx_lens) * n_kv * (k_dim + (0 if value_in_key else v_dim)) * 2


def median_ms(fn, graph: bool = False, rep: int = 100) -> float:
    if graph:
        return do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return do_bench(fn, rep=rep, return_mode="median")


def sdpa_decode_peer(batch: int, ctx: int, shape: tuple):
    """Dense SDPA over contiguous K/V of the same sizes: the no-paging peer."""
    n_heads, n_kv, k_dim, v_dim, _ = shape
    q = torch.randn(batch, n_heads, 1, k_dim, device="cuda", dtype=DT)
    k = torch.randn(batch, n_kv, ctx, k_dim, device="cuda", dtype=DT)
    v = torch.randn(batch, n_kv, ctx, v_dim, device="cuda", dtype=DT)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != n_heads)


def decode_rows(bw: float) -> list[dict]:
    rows = []
    for name, shape in SHAPES.items():
        for batch in (1, 64, 256):
            for ctx in (512, 2048):
                args = paged_inputs([ctx] * batch, [1] * batch, shape)
                row = {"kind": "decode", "shape": name, "batch": batch, "ctx": ctx}
                row["triton_us"] = 1e3 * median_ms(lambda: paged_attention(*args))
                row["graph_us"] = 1e3 * median_ms(lambda: paged_attention(*args), graph=True)
                row["ref_us"] = 1e3 * median_ms(lambda: reference.paged_attention(*args), rep=30)
                try:
                    row["sdpa_us"] = 1e3 * median_ms(sdpa_decode_peer(batch, ctx, shape))
                except RuntimeError as err:           # e.g. no SDPA backend for this head shape
                    row["sdpa_us"], row["sdpa_error"] = float("nan"), str(err)[:200]
                row["gbs"] = kv_bytes([ctx] * batch, shape) / row["graph_us"] / 1e3
                row["pct_bw"] = 100 * row["gbs"] / bw
                rows.append(row)
                print(json.dumps(row), flush=True)
                del args
    return rows


def causal_flops(ctx_lens: list[int], q_lens: list[int], shape: tuple) -> float:
    n_heads, _, k_dim, v_dim, _ = shape
    pairs = sum(sum(c - q + i + 1 for i in range(q)) for c, q in zip(ctx_lens, q_lens))
    return 2.0 * pairs * n_heads * (k_dim + v_dim)


def prefill_rows() -> list[dict]:
    rows = []
    work = [("qwen3-0.6b", [1024] * 4, [1024] * 4), ("qwen3-0.6b", [2048] * 4, [512] * 4),
            ("1b", [1024] * 4, [1024] * 4), ("mla-v2lite", [1024] * 2, [1024] * 2)]
    gqa_sweep = [TileConfig(128, 128, 8, 3, False), TileConfig(128, 64, 8, 3),
                 TileConfig(64, 64, 4, 2), TileConfig(64, 64, 4, 2, False)]
    mla_sweep = [TileConfig(32, 32, 4, 2, False), TileConfig(32, 32, 8, 1)]
    for name, ctx_lens, q_lens in work:
        shape = SHAPES[name]
        args = paged_inputs(ctx_lens, q_lens, shape)
        flops = causal_flops(ctx_lens, q_lens, shape)
        group = shape[0] // shape[1]
        default = pick_config(False, group, shape[2])
        configs = [default] + [c for c in (gqa_sweep if shape[2] <= 128 else mla_sweep) if c != default]
        for cfg in configs:
            row = {"kind": "prefill", "shape": name, "batch": len(ctx_lens), "ctx": ctx_lens[0],
                   "q_len": q_lens[0], "config": config_name(cfg, default)}
            try:
                row["triton_us"] = 1e3 * median_ms(lambda: paged_attention(*args, config=cfg))
                row["tflops"] = flops / row["triton_us"] / 1e6
            except Exception as err:                  # a config that does not fit: report, go on
                row["triton_us"], row["error"] = float("nan"), str(err)[:200]
            if cfg == default and ctx_lens == q_lens:
                n_heads, n_kv, k_dim, v_dim, _ = shape
                qd = torch.randn(len(ctx_lens), n_heads, q_lens[0], k_dim, device="cuda", dtype=DT)
                kd = torch.randn(len(ctx_lens), n_kv, ctx_lens[0], k_dim, device="cuda", dtype=DT)
                vd = torch.randn(len(ctx_lens), n_kv, ctx_lens[0], v_dim, device="cuda", dtype=DT)
                try:
                    row["sdpa_us"] = 1e3 * median_ms(lambda: F.scaled_dot_product_attention(
                        qd, kd, vd, is_causal=True, enable_gqa=n_kv != n_heads))
                except RuntimeError as err:
                    row["sdpa_us"], row["sdpa_error"] = float("nan"), str(err)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def group_inputs(groups: list[tuple[int, list[int]]], shape: tuple, device: str = "cuda") -> tuple:
    """Decode inputs for sequences in groups that share a prompt's whole pages: groups is
    [(prompt length, [own tokens after the prompt, one per member])]. A member's context is the
    prompt plus its own tokens; the prompt's full pages are the group's, the rest private."""
    n_heads, n_kv, k_dim, v_dim, value_in_key = shape
    tables, ctx_lens, at = [], [], 0
    for prompt, owns in groups:
        shared = list(range(at, at + prompt // PAGE))
        at += len(shared)
        for own in owns:
            ctx = prompt + own
            private = math.ceil(ctx / PAGE) - len(shared)
            tables.append(shared + list(range(at, at + private)))
            at += private
            ctx_lens.append(ctx)
    perm = torch.randperm(at + 1, device="cpu")
    width = max(len(t) for t in tables)
    table = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, :len(t)] = perm[t].int()
    k_cache = torch.randn(at + 1, PAGE, n_kv, k_dim, device=device, dtype=DT)
    v_cache = None if value_in_key else torch.randn(at + 1, PAGE, n_kv, v_dim, device=device, dtype=DT)
    n = len(ctx_lens)
    q = torch.randn(n, n_heads, k_dim, device=device, dtype=DT)
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32, device=device)
    return (q, k_cache, v_cache, table.to(device), cu, ctx, k_dim ** -0.5, v_dim), ctx_lens, table


def cascade_rows(bw: float) -> list[dict]:
    """Cascade decode (graph replays) on the two shapes it is for, against plain decode: GRPO
    rollouts (32 prompts of 64-256 tokens x 8 samples, 128 own tokens each) and W2 (256 requests
    behind a 2,000-token system prompt). Also the own tokens alone without cascade (the part the
    per-sequence kernel reads) and other prefix-kernel tiles (chunk rows x keys per step)."""
    import numpy as np
    import random

    from astrai_serve.kernels.cascade import graph_plan_len, pad_plan, plan_cascade, prefix_block_rows

    rng = random.Random(0)
    shape = SHAPES["qwen3-0.6b"]
    group = shape[0] // shape[1]
    cases = {"rollout": [(rng.randint(64, 256), [128] * 8) for _ in range(32)],
             "w2": [(2000, [rng.randint(50, 150) + 32 for _ in range(256)])]}
    rows = []
    for name, groups in cases.items():
        args, ctx_lens, table = group_inputs(groups, shape)
        n = len(ctx_lens)
        own = [c - p // PAGE * PAGE for (p, owns) in groups for c in (p + o for o in owns)]
        base = {"kind": "cascade", "shape": name, "batch": n, "ctx": int(sum(ctx_lens) / n)}

        def add(variant: str, fn, read: int) -> None:
            row = dict(base, config=variant)
            try:
                row["graph_us"] = 1e3 * median_ms(fn, graph=True)
                row["gbs"] = read / row["graph_us"] / 1e3
                row["pct_bw"] = 100 * row["gbs"] / bw
            except Exception as err:
                row["graph_us"], row["error"] = float("nan"), str(err)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)

        add("plain", lambda: paged_attention(*args), kv_bytes(ctx_lens, shape))
        plain_out = paged_attention(*args).float()
        own_args = paged_inputs(own, [1] * n, shape)
        add("own tokens only", lambda: paged_attention(*own_args), kv_bytes(own, shape))
        distinct = kv_bytes(own, shape) + kv_bytes([p // PAGE * PAGE for p, _ in groups], shape)
        for prefix_rows, block_n, warps, stages in [(64, 64, 4, 2), (64, 32, 4, 2), (64, 128, 4, 2),
                                                     (64, 64, 4, 1), (32, 64, 4, 2), (16, 64, 4, 2),
                                                     (16, 32, 2, 2), (64, 64, 8, 2), (128, 64, 8, 2),
                                                     (128, 32, 8, 2), (128, 64, 8, 3)]:
            plan, saved = plan_cascade(table.numpy().astype(np.int64), np.asarray(ctx_lens), PAGE,
                                       max(1, prefix_rows // group))
            padded = torch.tensor(pad_plan(plan, n, n), device="cuda")
            assert padded.numel() == graph_plan_len(n) and saved > 0
            cfg = TileConfig(prefix_rows, block_n, warps, stages)
            try:     # a tile that does not fit (registers, shared memory) is a row of its own, not the end
                err = (paged_attention(*args, cascade=padded, prefix_config=cfg).float() - plain_out).abs().max().item()
            except Exception as exc:
                rows.append(dict(base, config=f"cascade prefix {prefix_rows}x{block_n} w{warps} s{stages}",
                                 graph_us=float("nan"), error=str(exc)[:200]))
                continue
            if err > 3e-2:
                raise AssertionError(f"cascade {cfg} differs from plain decode by {err:.3g} on {name}")
            engine_tile = (prefix_block_rows(shape[2], group), 64, 4, 2)     # what paged_attention picks
            add(f"cascade prefix {prefix_rows}x{block_n} w{warps} s{stages}"
                + (" *" if (prefix_rows, block_n, warps, stages) == engine_tile else ""),
                lambda: paged_attention(*args, cascade=padded, prefix_config=cfg), distinct)
        del args, own_args
    return rows


def store_rows(bw: float) -> list[dict]:
    """One layer's K/V store into a bf16 cache of qwen3-0.6b's shape (8 kv heads x 128): the
    torch path's two index_copy_ launches against store_kv's one, for N = 1 and 256 new tokens
    (decode: graph replays are what the engine runs) and 16,384 (a prefill chunk: eager, L2
    flushed, is what the engine runs). k and v are bf16 column slices of a fused qkv projection,
    as the model hands them over; slots are distinct and scattered over twice the pages needed.
    GB/s counts K/V bytes read plus written."""
    from astrai_serve.kernels.reference import store_kv as store_torch
    from astrai_serve.kernels.triton_kv_store import store_kv as store_triton

    n_heads, n_kv, k_dim, v_dim, _ = SHAPES["qwen3-0.6b"]
    rows = []
    for n in (1, 256, 16384):
        pages = 2 * math.ceil(n / PAGE) + 1
        k_cache = torch.zeros(pages, PAGE, n_kv, k_dim, device="cuda", dtype=DT)
        v_cache = torch.zeros(pages, PAGE, n_kv, v_dim, device="cuda", dtype=DT)
        qkv = torch.randn(n, n_heads * k_dim + n_kv * (k_dim + v_dim), device="cuda", dtype=DT)
        _, k, v = qkv.split([n_heads * k_dim, n_kv * k_dim, n_kv * v_dim], dim=1)
        k, v = k.view(n, n_kv, k_dim), v.view(n, n_kv, v_dim)
        slots = torch.randperm(pages * PAGE, device="cuda")[:n]
        want = [k_cache.clone(), v_cache.clone()]
        store_torch(*want, k, v, slots)
        store_triton(k_cache, v_cache, k, v, slots)
        if not (torch.equal(k_cache, want[0]) and torch.equal(v_cache, want[1])):
            raise AssertionError(f"store_kv differs from index_copy_ at N={n}")
        moved = 2 * n * n_kv * (k_dim + v_dim) * DT.itemsize
        for variant, store in (("index_copy_ x2", store_torch), ("store_kv", store_triton)):
            row = {"kind": "store", "shape": "qwen3-0.6b", "batch": n, "ctx": "-", "config": variant}
            row["triton_us"] = 1e3 * median_ms(lambda: store(k_cache, v_cache, k, v, slots))
            row["graph_us"] = 1e3 * median_ms(lambda: store(k_cache, v_cache, k, v, slots), graph=True)
            row["gbs"] = moved / min(row["triton_us"], row["graph_us"]) / 1e3
            row["pct_bw"] = 100 * row["gbs"] / bw
            rows.append(row)
            print(json.dumps(row), flush=True)
        del k_cache, v_cache, qkv
    return rows


def config_name(cfg: TileConfig, default: TileConfig) -> str:
    return (f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
            + ("" if cfg.split_mask else " all-masked") + (" *" if cfg == default else ""))


def decode_config_rows(bw: float) -> list[dict]:
    """Other decode block shapes (graph replays) against the default (marked *)."""
    rows = []
    sweeps = [
        ("qwen3-0.6b", 64, 2048, [TileConfig(16, 128, 4, 2, False), TileConfig(16, 64, 4, 2),
                                  TileConfig(16, 64, 4, 2, False)]),
        ("1b", 256, 2048, [TileConfig(16, 128, 4, 2, False), TileConfig(16, 128, 4, 3)]),
        ("mla-v2lite", 64, 2048, [TileConfig(16, 64, 4, 2), TileConfig(16, 32, 4, 2, False)]),
        ("mla-v2lite", 256, 2048, [TileConfig(16, 64, 4, 2), TileConfig(16, 32, 8, 2)]),
    ]
    for name, batch, ctx, cfgs in sweeps:
        shape = SHAPES[name]
        args = paged_inputs([ctx] * batch, [1] * batch, shape)
        default = pick_config(True, shape[0] // shape[1], shape[2])
        for cfg in [default] + cfgs:
            row = {"kind": "decode-cfg", "shape": name, "batch": batch, "ctx": ctx,
                   "config": config_name(cfg, default)}
            try:
                row["graph_us"] = 1e3 * median_ms(lambda: paged_attention(*args, config=cfg), graph=True)
                row["gbs"] = kv_bytes([ctx] * batch, shape) / row["graph_us"] / 1e3
                row["pct_bw"] = 100 * row["gbs"] / bw
            except Exception as err:
                row["graph_us"], row["error"] = float("nan"), str(err)[:200]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def decode_split_rows(bw: float) -> list[dict]:
    """Small decode batches (W3's batch 1) at other KV split counts than decode_splits' (marked *):
    more splits fill the GPU, but each then reads a few dozen keys and the merge is one launch more."""
    from astrai_serve.kernels.triton_attention import decode_splits

    rows = []
    shape = SHAPES["qwen3-0.6b"]
    for batch in (1, 4):
        for ctx in (512, 768, 1024):
            args = paged_inputs([ctx] * batch, [1] * batch, shape)
            default = decode_splits(batch * shape[1], torch.device("cuda"))
            for splits in sorted({1, 2, 4, 8, 16, default}):
                row = {"kind": "splits", "shape": "qwen3-0.6b", "batch": batch, "ctx": ctx,
                       "config": f"{splits} splits" + (" *" if splits == default else "")}
                row["graph_us"] = 1e3 * median_ms(lambda: paged_attention(*args, num_splits=splits), graph=True)
                row["gbs"] = kv_bytes([ctx] * batch, shape) / row["graph_us"] / 1e3
                row["pct_bw"] = 100 * row["gbs"] / bw
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def print_table(device: str, bw: float, rows: list[dict]) -> None:
    print(f"\n# paged attention, {device}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bf16, page {PAGE}; copy bandwidth {bw:.0f} GB/s (read+write)")
    print(f"{'kind':10} {'shape':11} {'B':>4} {'ctx':>5} {'triton us':>10} {'graph us':>9} "
          f"{'ref us':>9} {'sdpa us':>9} {'GB/s':>6} {'%bw':>4} {'TFLOP/s':>7}  config")
    for r in rows:
        def f(key: str, fmt: str) -> str:
            v = r.get(key)
            return format(v, fmt) if isinstance(v, float) and not math.isnan(v) else "-"
        print(f"{r['kind']:10} {r['shape']:11} {r['batch']:>4} {r['ctx']:>5} {f('triton_us', '10.1f')} "
              f"{f('graph_us', '9.1f')} {f('ref_us', '9.0f')} {f('sdpa_us', '9.1f')} {f('gbs', '6.0f')} "
              f"{f('pct_bw', '4.0f')} {f('tflops', '7.1f')}  {r.get('config', '')}")


def main() -> int:
    parser = argparse.ArgumentParser(description="paged-attention kernels: GPU tests and timings")
    parser.add_argument("--no-tests", action="store_true", help="skip pytest -m gpu tests/test_kernels_gpu.py")
    parser.add_argument("--json", type=Path, default=None, help="write all rows here")
    parser.add_argument("--sections", default="decode,config,prefill,cascade,store",
                        help="comma list of table sections: decode, config, prefill, cascade, store, "
                             "splits (default all but splits)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/paged_attention.py needs a CUDA GPU")
    tests_rc = None
    if not args.no_tests:
        tests_rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--noconftest", "-p",
                                   "no:cacheprovider", "-o", "addopts=", "-m", "gpu",
                                   "tests/test_kernels_gpu.py"], cwd=REPO).returncode
    device = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs()
    sections = {"decode": decode_rows, "config": decode_config_rows, "prefill": lambda _bw: prefill_rows(),
                "cascade": cascade_rows, "store": store_rows, "splits": decode_split_rows}
    wanted = args.sections.split(",")
    if unknown := [w for w in wanted if w not in sections]:
        parser.error(f"--sections: unknown {unknown}; choose from {sorted(sections)}")
    rows = [row for w in wanted for row in sections[w](bw)]
    if args.json:
        args.json.write_text(json.dumps({"device": device, "copy_gbs": bw, "tests_rc": tests_rc,
                                         "rows": rows}, indent=1))
    print_table(device, bw, rows)
    if tests_rc is not None:
        print(f"GPU tests: {'passed' if tests_rc == 0 else f'FAILED (rc {tests_rc})'}")
    return tests_rc or 0


if __name__ == "__main__":
    raise SystemExit(main())
