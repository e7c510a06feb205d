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
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

import common  # noqa: E402  (puts the repository on sys.path)
from astrai_serve.kernels.triton_sampling import (  # noqa: E402
    BLOCK, PROGRAMS, _gumbel_argmax, split_plan)


def one_program_per_row(x: torch.Tensor, temps: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The kernel before the split: the engine's kernel with one split, so one program scans a
    whole row (plus the pick launch over one entry, ~2 µs, which the old kernel did not have)."""
    block = min(BLOCK, triton.next_power_of_2(x.shape[1]))
    return _gumbel_argmax(x, temps, keys, (block, triton.cdiv(x.shape[1], block) * block, 1))


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
