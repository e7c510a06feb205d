"""Triton paged attention (and the K/V store) on a CUDA GPU: against the torch reference in bf16/fp16,
graph capture, no syncs.

Run on a GPU machine: `pytest -m gpu tests/test_kernels_gpu.py` (bench/paged_attention.py runs it too).
"""
from __future__ import annotations

import pytest
import torch

from astrai_serve.kernels import get_attention_impl, reference
from astrai_serve.kernels.cases import make_case
from astrai_serve.kernels.selfcheck import GPU_CHECKS, cascade_plan, dense_tolerance, run_checks, tolerance

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("check", GPU_CHECKS, ids=[c.name for c in GPU_CHECKS])
def test_triton_matches_reference(check, dtype: str) -> None:
    """Decode (split and not), prefill, mixed, GQA groups 1/2/6, head dims 64/128, MLA 512+64."""
    [r] = run_checks([check], get_attention_impl("triton"), dtype, "cuda", seed=1)
    assert r["finite"] and r["shape_ok"] and r["out_dtype_ok"], r
    assert r["rel_err_ref"] <= tolerance(r["dtype"]), r
    assert r["rel_err_dense"] <= dense_tolerance(r), r


def test_fresh_inputs_each_run_agree() -> None:
    """Same kernel, new random draws: the error stays at rounding level (a race would wander)."""
    errs = [run_checks(GPU_CHECKS[:2], get_attention_impl("triton"), "bfloat16", "cuda", seed=s)
            for s in range(3)]
    for rs in errs:
        assert all(r["rel_err_ref"] <= tolerance("bfloat16") for r in rs), rs


def _reference_fp32(case) -> torch.Tensor:
    a = case.args()
    return reference.paged_attention(a[0].float(), a[1].float(),
                                     None if a[2] is None else a[2].float(), *a[3:])


@pytest.mark.parametrize("value_in_key, cascade", [(False, False), (True, False), (False, True), (True, True)])
def test_decode_has_no_host_sync_and_replays_in_a_cuda_graph(value_in_key: bool, cascade: bool) -> None:
    """A decode step captured once replays correctly after the lengths and queries change in place
    (with cascade: after the shared-prefix length changes too, here to 0 = off)."""
    impl = get_attention_impl("triton")
    shape = (16, 1, 576, 512) if value_in_key else (16, 8, 128, 128)
    case = make_case([100, 700, 1500], [1, 1, 1], *shape, page_size=16, value_in_key=value_in_key,
                     dtype=torch.bfloat16, device="cuda", seed=3, shared_prefix=64 if cascade else 0)
    kw = {"cascade": cascade_plan(case, "cuda")} if cascade else {}
    impl(*case.args(), **kw)                            # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        impl(*case.args(), **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        impl(*case.args(), **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = impl(*case.args(), **kw)
    if cascade:
        kw["cascade"].fill_(0)                          # a plan of zeros: cascade off, same graph
    case.context_lens.copy_(torch.tensor([37, 1, 1499], dtype=torch.int32))
    case.q.copy_(torch.randn_like(case.q))
    graph.replay()
    torch.cuda.synchronize()
    ref = _reference_fp32(case)
    assert float((out.float() - ref).norm() / ref.norm()) <= tolerance("bfloat16")


def test_prefill_has_no_host_sync() -> None:
    impl = get_attention_impl("triton")
    case = make_case([300, 90, 5], [300, 17, 1], 16, 8, 128, 128, 16, dtype=torch.bfloat16,
                     device="cuda", seed=4)
    impl(*case.args())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = impl(*case.args())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ref = _reference_fp32(case)
    assert float((out.float() - ref).norm() / ref.norm()) <= tolerance("bfloat16")


def test_gumbel_sampling_kernel_matches_reference() -> None:
    from astrai_serve.kernels.triton_sampling import selfcheck

    selfcheck()  # asserts kernel == torch reference on CUDA tensors


def test_gemv_kernel_matches_torch() -> None:
    from astrai_serve.kernels.triton_gemv import selfcheck

    selfcheck()  # bf16 on CUDA, against an fp32 matmul


def test_kv_store_kernel_matches_reference() -> None:
    from astrai_serve.kernels.triton_kv_store import selfcheck

    selfcheck()  # bit for bit on CUDA tensors, float32 -> bf16/fp16 casts included


@pytest.mark.parametrize("value_in_key", [False, True])
def test_kv_store_has_no_host_sync_and_replays_in_a_cuda_graph(value_in_key: bool) -> None:
    """One layer's store captured once (qwen3-0.6b's 8 x 128 or MLA's 1 x 576, bf16 views of a
    fused projection) replays the new K/V and slots written in place, padding rows included."""
    from astrai_serve.kernels.triton_kv_store import store_kv

    n_kv, k_dim, v_dim = (1, 576, 0) if value_in_key else (8, 128, 128)
    n, pad_slot = 6, 63 * 16                       # the last 2 rows are padding: one reserved slot
    k_cache = torch.randn(64, 16, n_kv, k_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = None if value_in_key else torch.randn(64, 16, n_kv, v_dim, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(n, 16 * k_dim + n_kv * (k_dim + v_dim), device="cuda", dtype=torch.bfloat16)
    k = qkv[:, 16 * k_dim:16 * k_dim + n_kv * k_dim].view(n, n_kv, k_dim)
    v = None if value_in_key else qkv[:, 16 * k_dim + n_kv * k_dim:].view(n, n_kv, v_dim)
    slots = torch.tensor([5, 17, 900, 33, pad_slot, pad_slot], device="cuda")
    store_kv(k_cache, v_cache, k, v, slots)             # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        store_kv(k_cache, v_cache, k, v, slots)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        store_kv(k_cache, v_cache, k, v, slots)
    qkv.copy_(torch.randn_like(qkv))
    qkv[4:] = qkv[4]                                    # padding rows repeat one token
    slots[:4] = torch.tensor([1000, 2, 511, 16], device="cuda")
    want_k = k_cache.clone()
    want_v = None if v_cache is None else v_cache.clone()
    reference.store_kv(want_k, want_v, k, v, slots)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(k_cache, want_k)
    assert v_cache is None or torch.equal(v_cache, want_v)
