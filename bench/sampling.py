"""The Gumbel-max sampling kernel on one CUDA GPU: one program per row (the kernel before the
split) against the split kernel the engine runs (astrai_serve/kernels/triton_sampling.py).

    python bench/sampling.py [--rows 1,64,256] [--vocab 151936] [--programs 2048] [--json bench-sampling.json]

Each case draws one token per row from S rows of V float32 logits (qwen3's vocabulary by
default) at temperature 1, seeded keys, both kernels checked against the torch reference first.
A call is captured in a CUDA graph and replayed (triton.testing.do_bench_cudagraph, median),
as the engine's graphed steps run it; replays do not flush L2, so S = 1 (0.6 MB) reads from L2.
GB/s counts the logits read once; "%copy" is that over the device-to-device copy bandwidth
(read + write) measured first. `--programs 512,1024,2048,4096` adds a split row per target of
programs a launch (split_plan's PROGRAMS is the engine's). Prints one table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import common  # noqa: E402  (puts the repository on sys.path)
from astrai_serve.kernels.triton_sampling import (  # noqa: E402
    BLOCK, PROGRAMS, _gumbel_argmax, _gumbel_score, split_plan)


@triton.jit
def _one_program_per_row_kernel(x_ptr, stride_x, temps_ptr, keys_ptr, out_ptr, V: tl.constexpr, BLOCK: tl.constexpr):
    # The kernel before the split, kept here only to compare with: program `row` scans all of V.
    row = tl.program_id(0)
    t = tl.load(temps_ptr + row)
    k0 = tl.load(keys_ptr + 2 * row).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * row + 1).to(tl.uint32)
    greedy = t <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, t)
    noise_on = tl.where(greedy, 0.0, 1.0)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=float("-inf")).to(tl.float32)
        score = tl.where(inside, _gumbel_score(x, offs, k0, k1, greedy, inv_t, noise_on), float("-inf"))
        better = score > best
        best = tl.where(better, score, best)
        best_i = tl.where(better, offs, best_i)
    top = tl.max(best, 0)
    tl.store(out_ptr + row, tl.min(tl.where(best == top, best_i, V), 0).to(tl.int64))


def one_program_per_row(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    _one_program_per_row_kernel[(x.shape[0],)](x, x.stride(0), temps, keys, out, x.shape[1],
                                                BLOCK=min(BLOCK, triton.next_power_of_2(x.shape[1])))
    return out


def copy_bandwidth_gbs() -> float:
    x = torch.empty(2 ** 28, device="cuda", dtype=torch.float32)        # 1 GiB
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * x.element_size() / ms / 1e6


def timed_us(fn) -> float:
    return do_bench_cudagraph(fn, return_mode="median") * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/sampling.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,256", help="comma-separated batch sizes S (default 1,64,256)")
    p.add_argument("--vocab", type=int, default=151936, help="V, logits per row (default qwen3's 151936)")
    p.add_argument("--programs", default=str(PROGRAMS),
                   help=f"comma-separated targets of programs a launch for split_plan (default {PROGRAMS})")
    p.add_argument("--json", default="bench-sampling.json", help="where to write the JSON results ('' for none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    import numpy as np

    from astrai_serve.kernels.gumbel import gumbel_argmax_reference, seeded_keys, split_keys

    bw = copy_bandwidth_gbs()
    v, rows = args.vocab, []
    for s in (int(r) for r in args.rows.split(",")):
        x = torch.randn(s, v, device="cuda") * 3
        temps = torch.ones(s, device="cuda")
        keys = torch.from_numpy(split_keys(seeded_keys(np.arange(s), np.arange(s) + 7))).cuda()
        want = gumbel_argmax_reference(x, temps, keys)
        if not torch.equal(one_program_per_row(x, temps, keys), want):
            raise AssertionError(f"the one-program-per-row kernel differs from the reference at S={s}")
        old_us = timed_us(lambda: one_program_per_row(x, temps, keys))
        for programs in (int(n) for n in args.programs.split(",")):
            plan = split_plan(s, v, programs)
            if not torch.equal(_gumbel_argmax(x, temps, keys, plan), want):
                raise AssertionError(f"the split kernel differs from the reference at S={s}, plan {plan}")
            us = timed_us(lambda plan=plan: _gumbel_argmax(x, temps, keys, plan))
            rows.append(dict(rows=s, vocab=v, programs=programs, block=plan[0], span=plan[1], splits=plan[2],
                             old_us=old_us, old_gbps=s * v * 4 / old_us / 1e3, split_us=us,
                             split_gbps=s * v * 4 / us / 1e3, speedup=old_us / us))
        del x, want
    print(f"\nGumbel-max sampling, V={v} fp32 logits, T=1, CUDA-graph replays (median), "
          f"{torch.cuda.get_device_name()}; copy bandwidth {bw:.0f} GB/s")
    print(f"{'S':>5} {'old us':>8} {'GB/s':>6} {'%copy':>6} {'programs':>9} {'splits':>6} {'span':>7} {'split us':>9} "
          f"{'GB/s':>6} {'%copy':>6} {'speedup':>8}")
    for r in rows:
        print(f"{r['rows']:>5} {r['old_us']:8.1f} {r['old_gbps']:6.0f} {100 * r['old_gbps'] / bw:5.0f}% "
              f"{r['programs']:>9} {r['splits']:>6} {r['span']:>7} {r['split_us']:9.1f} {r['split_gbps']:6.0f} "
              f"{100 * r['split_gbps'] / bw:5.0f}% {r['speedup']:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "bench/sampling.py", "environment": common.environment(),
                                               "copy_gbs": bw, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
