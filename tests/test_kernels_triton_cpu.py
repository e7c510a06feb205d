"""The Triton paged-attention kernels under Triton's CPU interpreter, against the torch reference.

The interpreter runs the same kernel source the GPU compiles, so indexing, masking, the causal
offset, GQA grouping (including a group of 6), page size 1, the MLA value-in-key path and the
split-K merge are all checked here; speed and bf16 tensor-core rounding need the GPU
(tests/test_kernels_gpu.py). Triton only interprets when TRITON_INTERPRET=1 is set before it is
first imported, so the cases run in one child process (`python -m astrai_serve.kernels.selfcheck`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from astrai_serve.kernels import get_attention_impl
from astrai_serve.kernels.cases import make_case
from astrai_serve.kernels.selfcheck import CPU_CHECKS, dense_tolerance, tolerance

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def interpreted(module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m module args` with TRITON_INTERPRET=1 (it must be set before Triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, dict]:
    proc = interpreted("astrai_serve.kernels.selfcheck", "--suite", "cpu", "--json")
    assert proc.stdout.strip(), f"selfcheck printed nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}


@pytest.mark.parametrize("name", [c.name for c in CPU_CHECKS])
def test_interpreted_kernel_matches_reference(interpreted_results: dict[str, dict], name: str) -> None:
    r = interpreted_results[name]
    assert r["finite"] and r["shape_ok"] and r["out_dtype_ok"], r
    assert r["rel_err_ref"] <= tolerance(r["dtype"]), r
    assert r["rel_err_dense"] <= dense_tolerance(r), r


def test_triton_impl_by_name_checks_dtypes() -> None:
    impl = get_attention_impl("triton")
    case = make_case([4], [1], 4, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="q's dtype or float8_e4m3fn"):
        impl(case.q.half(), *case.args()[1:])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        impl(case.q[:, :3], *case.args()[1:])


def test_interpreted_gumbel_sampling_kernel_matches_reference() -> None:
    # Same noise bits and same draws as the torch path (greedy rows, ties: first index).
    proc = interpreted("astrai_serve.kernels.triton_sampling")
    assert proc.returncode == 0 and "kernel == reference" in proc.stdout, proc.stderr[-3000:]


def test_interpreted_gemv_kernel_matches_torch() -> None:
    proc = interpreted("astrai_serve.kernels.triton_gemv")
    assert proc.returncode == 0 and "kernel == torch" in proc.stdout, proc.stderr[-3000:]


def test_interpreted_kv_store_kernel_matches_reference() -> None:
    # GQA strided views of a fused projection cast into bf16/fp16 caches, rows wider than a
    # program, MLA (no values), no tokens, a CUDA graph's padding rows on one slot.
    proc = interpreted("astrai_serve.kernels.triton_kv_store")
    assert proc.returncode == 0 and "kernel == reference" in proc.stdout, proc.stderr[-3000:]


def _store_args(n: int = 3, n_kv: int = 2, k_dim: int = 16, v_dim: int = 8) -> dict:
    return {"k_cache": torch.zeros(4, 16, n_kv, k_dim, dtype=torch.bfloat16),
            "v_cache": torch.zeros(4, 16, n_kv, v_dim, dtype=torch.bfloat16),
            "k": torch.randn(n, n_kv, k_dim), "v": torch.randn(n, n_kv, v_dim),
            "slots": torch.arange(n)}


@pytest.mark.parametrize("store", ["torch", "triton"])
@pytest.mark.parametrize("bad, match", [
    ({"k": torch.randn(3, 2, 12)}, r"k must be \[N,Hkv,Dk\].*got k \(3, 2, 12\)"),
    ({"v": None}, "values and value cache go together: got v None"),
    ({"v_cache": None}, "values and value cache go together"),
    ({"v": torch.randn(3, 2, 16)}, r"v \(3, 2, 16\) and v_cache \(4, 16, 2, 8\) do not match"),
    ({"v_cache": torch.zeros(4, 16, 2, 8)}, "share a dtype; got torch.bfloat16 and torch.float32"),
    ({"k": torch.ones(3, 2, 16, dtype=torch.int32)}, "k must be floating point; got torch.int32"),
    ({"k_cache": torch.zeros(16, 4, 2, 16, dtype=torch.bfloat16).transpose(0, 1)}, "k_cache must be contiguous"),
    ({"slots": torch.arange(3, dtype=torch.int32)}, r"slots must be int64 \[N\] with N=3.*torch.int32"),
    ({"slots": torch.arange(4)}, r"slots must be int64 \[N\] with N=3 .*\(4,\)"),
])
def test_kv_store_rejects_bad_arguments(store: str, bad: dict, match: str) -> None:
    from astrai_serve.kernels import reference
    from astrai_serve.kernels.triton_kv_store import store_kv

    fn = reference.store_kv if store == "torch" else store_kv      # checks run before any launch
    with pytest.raises(ValueError, match=match):
        fn(**{**_store_args(), **bad})


def test_store_goes_with_the_kernel() -> None:
    from astrai_serve.kernels import get_store_impl_for, reference
    from astrai_serve.kernels.triton_kv_store import store_kv

    assert get_store_impl_for(get_attention_impl("torch")) is reference.store_kv
    assert get_store_impl_for(get_attention_impl("triton")) is store_kv
    assert get_store_impl_for(lambda *a, **kw: None) is reference.store_kv    # e.g. a test's wrapper
