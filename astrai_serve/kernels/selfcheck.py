"""Check a paged-attention implementation against the torch reference on a table of random cases.

    python -m astrai_serve.kernels.selfcheck --suite gpu --dtype bfloat16          # on a GPU
    TRITON_INTERPRET=1 python -m astrai_serve.kernels.selfcheck --suite cpu --json  # Triton's interpreter

Each case is drawn fresh (make_case), run through the implementation, and compared by relative
error ||out - ref|| / ||ref|| with the reference computed in fp32 from the same inputs, and with
dense SDPA over the contiguous K/V. Output rows left unwritten or NaN fail the `finite` check.
The CPU tests run this in a subprocess because Triton's interpreter must be switched on before
Triton is first imported; the GPU tests call `run_checks` in-process.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from astrai_serve.kernels import reference
from astrai_serve.kernels.cascade import max_chunk_seqs, plan_cascade
from astrai_serve.kernels.cases import dense_attention, make_case


@dataclass(frozen=True)
class Check:
    """One random case: sequences of ctx_lens cached tokens whose last q_lens are queried."""

    name: str                       # unique, used as the test id
    ctx_lens: tuple[int, ...]       # context length of each sequence (new tokens included)
    q_lens: tuple[int, ...]         # queries per sequence (1 everywhere = a decode batch)
    n_heads: int                    # query heads
    n_kv: int                       # kv heads
    k_dim: int                      # key channels (MLA: latent + rope)
    v_dim: int                      # value channels
    page_size: int = 16             # token slots per page
    value_in_key: bool = False      # MLA: value = key[..., :v_dim], no value cache
    num_splits: int | None = None   # force the decode split count (None: the implementation picks)
    dtype: str | None = None        # override the suite's dtype
    config: tuple | None = None     # TileConfig fields to force (None: the implementation picks)
    shared_prefix: int | None = None  # tokens each prefix group holds in the same pages: run with a cascade plan
    prefix_groups: tuple[int, ...] | None = None  # group of each sequence (None: one group for all)
    fp8_cache: bool = False         # store the pages in float8 e4m3 (EngineConfig.kv_cache_dtype="fp8")


CPU_CHECKS = [
    Check("decode_split4_g1", (1, 150, 40), (1, 1, 1), 2, 2, 16, 16, 16, num_splits=4),
    Check("decode_split3_g4_page1", (1, 150, 40), (1, 1, 1), 4, 1, 16, 16, 1, num_splits=3),
    Check("decode_nosplit_g6", (1, 150, 40), (1, 1, 1), 12, 2, 16, 16, 16, num_splits=1),
    Check("mixed_g1", (140, 90, 1, 20), (140, 17, 1, 1), 1, 1, 16, 16, 16),
    Check("mixed_g2_small_tiles_all_masked", (70, 90, 1, 20), (70, 17, 1, 1), 2, 1, 16, 16, 16,
          config=(32, 16, 4, 2, False)),
    Check("mixed_g6_page1", (70, 90, 1, 20), (70, 17, 1, 1), 6, 1, 16, 16, 1),
    Check("mla_decode", (75, 9, 200), (1, 1, 1), 4, 1, 40, 32, 16, True, num_splits=3),
    Check("mla_prefill", (75, 40), (30, 40), 4, 1, 40, 32, 16, True),
    Check("decode_fp16", (40, 70), (1, 1), 4, 2, 32, 32, 16, num_splits=2, dtype="float16"),
    # cascade: a shared prefix attended once for all sequences, the rest per sequence
    Check("cascade_g2_split2", (97, 200, 65, 130), (1, 1, 1, 1), 4, 2, 16, 16, 16, num_splits=2,
          shared_prefix=64),
    Check("cascade_g1_nosplit_page1", (40, 41, 90), (1, 1, 1), 2, 2, 16, 16, 1, num_splits=1,
          shared_prefix=39),
    Check("cascade_mla", (75, 90, 200), (1, 1, 1), 4, 1, 40, 32, 16, True, num_splits=2, shared_prefix=48),
    Check("cascade_off", (97, 20), (1, 1), 4, 2, 16, 16, 16, num_splits=1, shared_prefix=0),
    # an fp8 cache, widened as it is loaded: decode with a merge, a mixed step, MLA, cascade
    Check("fp8_decode_split2_g2", (1, 150, 40), (1, 1, 1), 4, 2, 16, 16, 16, num_splits=2, fp8_cache=True),
    Check("fp8_mixed_g2", (70, 90, 1, 20), (70, 17, 1, 1), 4, 2, 16, 16, 16, fp8_cache=True),
    Check("fp8_mla_decode", (75, 9, 200), (1, 1, 1), 4, 1, 40, 32, 16, True, num_splits=3, fp8_cache=True),
    Check("fp8_cascade_g2", (97, 200, 65, 130), (1, 1, 1, 1), 4, 2, 16, 16, 16, num_splits=2,
          shared_prefix=64, fp8_cache=True),
    # GRPO's shape: groups of samples behind their own prompts, one sequence alone, a long group
    # cut into chunks of 8 (64 rows per program over a group of 8 heads)
    Check("cascade_groups_g8", (40, 50, 45, 33, 60, 70, 80, 90, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44),
          (1,) * 18, 16, 2, 16, 16, 16, num_splits=2, shared_prefix=32,
          prefix_groups=(0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3)),
]

GPU_CHECKS = [
    # qwen3-0.6b (16/8 heads of 128), 1b (24/4 heads of 64: a group of 6), decode at several sizes
    Check("decode_q06b_b1", (2000,), (1,), 16, 8, 128, 128),
    Check("decode_q06b_b7", (1, 17, 300, 513, 1024, 2048, 4000), (1,) * 7, 16, 8, 128, 128),
    Check("decode_q06b_b64_nosplit", tuple(range(3, 64 * 37, 37)), (1,) * 64, 16, 8, 128, 128,
          num_splits=1),
    Check("decode_1b_b5", (5, 100, 700, 1500, 3000), (1,) * 5, 24, 4, 64, 64),
    Check("decode_1b_b5_split7", (5, 100, 700, 1500, 3000), (1,) * 5, 24, 4, 64, 64, num_splits=7),
    # prefill: whole prompts, chunks over a cached prefix, mixed with decodes
    Check("prefill_q06b", (1000, 333, 64), (1000, 333, 64), 16, 8, 128, 128),
    Check("mixed_q06b", (1500, 700, 40, 2), (512, 100, 1, 1), 16, 8, 128, 128),
    Check("mixed_1b", (900, 260, 33), (256, 260, 1), 24, 4, 64, 64),
    Check("prefill_g1_d64", (300, 129), (300, 2), 8, 8, 64, 64),
    Check("mixed_q06b_64x64_all_masked", (1500, 700, 40, 2), (512, 100, 1, 1), 16, 8, 128, 128,
          config=(64, 64, 4, 2, False)),
    Check("decode_q06b_b7_all_masked", (1, 17, 300, 513, 1024, 2048, 4000), (1,) * 7, 16, 8, 128,
          128, config=(16, 64, 4, 2, False)),
    # MLA absorbed shape (DeepSeek-V2-Lite: 16 heads, latent 512 + rope 64) and mla-tiny
    Check("mla_decode_b1", (1800,), (1,), 16, 1, 576, 512, value_in_key=True),
    Check("mla_decode_b9", (1, 50, 128, 129, 640, 1000, 1400, 2047, 3000), (1,) * 9, 16, 1, 576, 512,
          value_in_key=True),
    Check("mla_prefill", (600, 300, 5), (200, 300, 1), 16, 1, 576, 512, value_in_key=True),
    Check("mla_tiny_mixed", (600, 30, 5), (200, 30, 1), 4, 1, 80, 64, value_in_key=True),
    Check("decode_fp16_q06b", (700, 1200), (1, 1), 16, 8, 128, 128, dtype="float16"),
    # cascade (W2's shape): 2,000 shared tokens, then each sequence's own question and answer
    Check("cascade_q06b_b64", tuple(2000 + 50 + 7 * i for i in range(64)), (1,) * 64, 16, 8, 128, 128,
          shared_prefix=2000),
    Check("cascade_q06b_b3_split5", (2001, 2100, 3000), (1, 1, 1), 16, 8, 128, 128, num_splits=5,
          shared_prefix=1984),
    # GRPO's shape: 32 prompts of 64-256 tokens, 8 samples each, 1-256 tokens generated
    Check("cascade_q06b_grpo_32x8", tuple(64 + (37 * i) % 192 + (i * 13) % 200 + 1 for i in range(256)),
          (1,) * 256, 16, 8, 128, 128, shared_prefix=64, prefix_groups=tuple(i // 8 for i in range(256))),
    Check("cascade_mla_b9", tuple(1000 + 13 * i for i in range(9)), (1,) * 9, 16, 1, 576, 512,
          value_in_key=True, shared_prefix=992),
    # an fp8 cache (EngineConfig.kv_cache_dtype="fp8"): GRPO-sized decode, a mixed step, MLA
    Check("fp8_decode_q06b_b7", (1, 17, 300, 513, 1024, 2048, 4000), (1,) * 7, 16, 8, 128, 128, fp8_cache=True),
    Check("fp8_mixed_q06b", (1500, 700, 40, 2), (512, 100, 1, 1), 16, 8, 128, 128, fp8_cache=True),
    Check("fp8_mla_decode_b9", (1, 50, 128, 129, 640, 1000, 1400, 2047, 3000), (1,) * 9, 16, 1, 576, 512,
          value_in_key=True, fp8_cache=True),
]

def cascade_plan(case: Any, device: str) -> torch.Tensor:
    """The engine's planner on the case's page tables, with a graph-like slot for every pair."""
    n_seqs, group = len(case.keys), case.q.shape[1] // case.k_cache.shape[2]
    plan, _ = plan_cascade(case.page_table.cpu().numpy(), case.context_lens.cpu().numpy(),
                           case.k_cache.shape[1], max_chunk_seqs(group, case.q.shape[2]), capacity=n_seqs // 2)
    return torch.from_numpy(plan).to(device)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def run_checks(checks: list[Check], impl: Callable[..., torch.Tensor], dtype: str,
               device: str, seed: int = 0) -> list[dict]:
    """Run every check through impl; one dict per check with its errors against both oracles."""
    results = []
    for i, c in enumerate(checks):
        dt = DTYPES[c.dtype or dtype]
        case = make_case(list(c.ctx_lens), list(c.q_lens), c.n_heads, c.n_kv, c.k_dim, c.v_dim,
                         c.page_size, c.value_in_key, dt, device, seed=seed * 1000 + i,
                         shared_prefix=c.shared_prefix or 0,
                         prefix_groups=None if c.prefix_groups is None else list(c.prefix_groups))
        if c.fp8_cache:     # the reference reads the same rounded pages; dense SDPA the exact K/V
            case.k_cache = case.k_cache.to(torch.float8_e4m3fn)
            case.v_cache = None if case.v_cache is None else case.v_cache.to(torch.float8_e4m3fn)
        kwargs = {} if c.num_splits is None else {"num_splits": c.num_splits}
        if c.shared_prefix is not None:
            kwargs["cascade"] = cascade_plan(case, device)
        if c.config is not None:
            from astrai_serve.kernels.triton_attention import TileConfig
            kwargs["config"] = TileConfig(*c.config)
        out = impl(*case.args(), **kwargs)
        up = case.args()
        ref = reference.paged_attention(up[0].float(), up[1].float(),
                                        None if up[2] is None else up[2].float(), *up[3:])
        dense = dense_attention(case)
        results.append({
            **asdict(c), "dtype": str(dt).removeprefix("torch."),
            "out_dtype_ok": out.dtype == dt,
            "shape_ok": tuple(out.shape) == (case.q.shape[0], c.n_heads, c.v_dim),
            "finite": bool(torch.isfinite(out).all()),
            "rel_err_ref": rel_err(out, ref), "rel_err_dense": rel_err(out, dense),
            "max_abs_err": float((out.float() - ref).abs().max()),
        })
    return results


def tolerance(dtype: str) -> float:
    """Relative-error bound per storage dtype (bf16 operands land between 1e-3 and 1e-2)."""
    return {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}[dtype]


FP8_DENSE_TOLERANCE = 0.08   # against exact K/V: e4m3 keeps 3 mantissa bits (<= 6.25% per value)


def dense_tolerance(result: dict) -> float:
    """The bound against dense SDPA over the exact K/V: the dtype's, or fp8 rounding's."""
    return FP8_DENSE_TOLERANCE if result["fp8_cache"] else tolerance(result["dtype"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu", help="which case table")
    parser.add_argument("--impl", default="triton", help="implementation name (torch|triton)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="storage dtype (default float32 on cpu, bfloat16 on gpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--only", default="", help="run only the checks whose name contains this")
    args = parser.parse_args(argv)
    from astrai_serve.kernels import get_attention_impl
    from astrai_serve.kernels.cases import patch_triton_interpreter

    device = "cuda" if args.suite == "gpu" else "cpu"
    if device == "cpu" and args.impl == "triton":
        patch_triton_interpreter()          # CPU tensors only run under TRITON_INTERPRET=1
    dtype = args.dtype or ("bfloat16" if args.suite == "gpu" else "float32")
    checks = [c for c in (GPU_CHECKS if args.suite == "gpu" else CPU_CHECKS) if args.only in c.name]
    results = run_checks(checks, get_attention_impl(args.impl), dtype, device)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'check':28} {'dtype':9} {'rel_err_ref':>11} {'rel_err_dense':>13} ok")
        for r in results:
            ok = r["finite"] and r["shape_ok"] and r["rel_err_ref"] <= tolerance(r["dtype"])
            print(f"{r['name']:28} {r['dtype']:9} {r['rel_err_ref']:11.2e} {r['rel_err_dense']:13.2e} "
                  f"{'yes' if ok else 'NO'}")
    bad = [r for r in results if not (r["finite"] and r["shape_ok"] and r["out_dtype_ok"]
                                      and r["rel_err_ref"] <= tolerance(r["dtype"]))]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
