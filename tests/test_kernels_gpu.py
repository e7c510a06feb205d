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


def test_qk_norm_rope_kernel_matches_torch() -> None:
    from astrai_serve.kernels.triton_qk_norm_rope import selfcheck

    selfcheck()  # bf16: within 1 ulp of fp32 per element, <= 0.02 x max from eager bf16, N up to 256


def test_qk_norm_rope_op_compiled_matches_eager_and_compiles_once() -> None:
    """The op inside a fullgraph torch.compile (one opaque node, Inductor code around it) gives
    eager's result bit for bit; batch sizes 1..256 and misaligned q/k/cos/sin views reuse one
    compiled Triton kernel (N is the grid, the pointers are not specialised on alignment)."""
    from astrai_serve.kernels.triton_qk_norm_rope import _qk_norm_rope_kernel, qk_norm_rope

    n_heads, n_kv, dim = 16, 8, 128
    width = (n_heads + 2 * n_kv) * dim
    w_q = torch.rand(dim, device="cuda", dtype=torch.bfloat16) + 0.5
    w_k = torch.rand(dim, device="cuda", dtype=torch.bfloat16) + 0.5
    table = torch.randn(300, dim + 1, device="cuda", dtype=torch.bfloat16)

    def step(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = qkv.shape[0]
        q, k, _ = (qkv * 1.5).split([n_heads * dim, n_kv * dim, n_kv * dim], dim=-1)
        q, k = qk_norm_rope(q.view(n, n_heads, dim), k.view(n, n_kv, dim), w_q, w_k, cos, sin, 1e-6)
        return q * 2, k + 1                                         # one rounding each, as eager

    compiled = torch.compile(step, fullgraph=True)
    for n in (1, 3, 64, 256):
        qkv = torch.randn(n, width, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 300, (n,), device="cuda")
        cos, sin = table[pos, :dim], table[pos, 1:]                 # gathered rows, as the model's
        got, want = compiled(qkv, cos, sin), step(qkv, cos, sin)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), n

    caches = getattr(_qk_norm_rope_kernel, "device_caches", None)
    if caches is None:                                              # another Triton's internals
        pytest.skip("cannot count this Triton's compiled kernels")
    compiled_kernels = caches[torch.cuda.current_device()][0]
    before = len(compiled_kernels)
    for n, offset in ((1, 1), (2, 3), (7, 0), (129, 5)):
        # same strides as above, every input pointer 2 * offset bytes off a 16-byte boundary
        def flat(rows: int, cols: int) -> torch.Tensor:
            base = torch.randn(rows * cols + 8, device="cuda", dtype=torch.bfloat16)
            return base[offset:offset + rows * cols].view(rows, cols)

        qkv, cos, sin = flat(n, width), flat(n, dim), flat(n, dim)
        q = qkv[:, :n_heads * dim].view(n, n_heads, dim)
        k = qkv[:, n_heads * dim:(n_heads + n_kv) * dim].view(n, n_kv, dim)
        got = qk_norm_rope(q, k, w_q, w_k, cos, sin, 1e-5)
        want = qk_norm_rope(q.clone(), k.clone(), w_q, w_k, cos.clone(), sin.clone(), 1e-5)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), (n, offset)
    assert len(compiled_kernels) == before, "a batch size or an alignment compiled a new kernel"


def test_gemv_pdl_chain_in_a_cuda_graph_equals_plain_launches() -> None:
    """Layer-shaped GEMVs (silu prologue included), each reading the one before's output, launched
    with programmatic dependent launch inside a captured CUDA graph: replays give the bits of the
    same chain launched plainly, also after the input changes in place."""
    import torch.nn.functional as F

    from astrai_serve.kernels.decode_matmul import DecodeOps
    from astrai_serve.kernels.triton_gemv import pdl_supported

    if not pdl_supported("cuda"):
        pytest.skip("PDL needs a GPU of compute capability 9.0+")
    g = torch.Generator(device="cuda").manual_seed(0)
    dim, ffn, layers = 256, 384, 4
    weights = [(torch.randn(2 * dim, dim, device="cuda", generator=g, dtype=torch.bfloat16) / dim ** 0.5,
                torch.randn(2 * ffn, dim, device="cuda", generator=g, dtype=torch.bfloat16) / dim ** 0.5,
                torch.randn(dim, ffn, device="cuda", generator=g, dtype=torch.bfloat16) / ffn ** 0.5)
               for _ in range(layers)]

    def chain(ops: DecodeOps, x: torch.Tensor) -> torch.Tensor:
        for w_a, w_up, w_down in weights:
            x = ops.linear(ops.linear(x, w_a)[:, :dim] * 1.0, w_a[:dim, :])   # a torch kernel between GEMVs too
            x = ops.silu_mul_linear(ops.linear(x, w_up), w_down)
        return x

    x = torch.randn(3, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    want = chain(DecodeOps(), x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                                # compile outside the capture
        chain(DecodeOps(pdl=True), x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(DecodeOps(pdl=True), x)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    x.copy_(torch.randn(3, dim, device="cuda", generator=g, dtype=torch.bfloat16))
    want = chain(DecodeOps(), x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)
    gate, up = (out @ weights[0][1].T).chunk(2, dim=-1)             # and the prologue is SwiGLU's math
    assert torch.allclose(DecodeOps(pdl=True).silu_mul_linear(out @ weights[0][1].T, weights[0][2]).float(),
                          F.linear(F.silu(gate) * up, weights[0][2]).float(), rtol=2e-2, atol=2e-2)


def test_norm_kernels_match_torch() -> None:
    from astrai_serve.kernels.triton_norm import selfcheck

    selfcheck()  # fp32/bf16/fp16 through the ops, N 0..256, D up to 8192: ulps from the torch formula


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_ops_have_no_host_sync_and_replay_in_a_cuda_graph(dtype: torch.dtype) -> None:
    """add_rms_norm (with and without a residual) and silu_mul captured once (qwen3-0.6b's D=1024,
    K=3072, 4 rows) replay new inputs written in place to the bits of direct calls, and other
    batch sizes reuse the compiled kernels (N is the grid)."""
    from astrai_serve.kernels.triton_norm import _rms_norm_kernel, add_rms_norm, silu_mul

    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).mul(3).to(dtype)

    x, res, gate_up = randn(4, 1024), randn(4, 1024), randn(4, 2 * 3072)
    w = (1 + 0.3 * randn(1024).float()).to(dtype)

    def step() -> list[torch.Tensor]:
        normed, r = add_rms_norm(x, res, w, 1e-6)
        first, same = add_rms_norm(x, None, w, 1e-6)
        assert same is x
        return [normed, r, first, silu_mul(gate_up)]

    step()                                              # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for _ in range(2):
        for t in (x, res, gate_up):
            t.copy_(randn(*t.shape))
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, w_) for o, w_ in zip(outs, step()))

    caches = getattr(_rms_norm_kernel, "device_caches", None)
    if caches is None:                                  # another Triton's internals
        pytest.skip("cannot count this Triton's compiled kernels")
    compiled = caches[torch.cuda.current_device()][0]
    before = len(compiled)
    for n in (1, 7, 300):
        add_rms_norm(randn(n, 1024), randn(n, 1024), w, 1e-6)
    assert len(compiled) == before, "a batch size compiled a new kernel"


def test_norm_ops_compiled_match_eager() -> None:
    """Inside a fullgraph torch.compile (Inductor code around the opaque ops) the ops give eager's bits."""
    from astrai_serve.kernels.triton_norm import add_rms_norm, silu_mul

    w = torch.rand(1024, device="cuda", dtype=torch.bfloat16) + 0.5

    def layer(h: torch.Tensor, res: torch.Tensor, gate_up: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normed, res = add_rms_norm(h * 1.5, res, w, 1e-6)
        return normed * 2, res + 1, silu_mul(gate_up * 0.5)

    compiled = torch.compile(layer, fullgraph=True)
    for n in (1, 5, 64):
        args = [torch.randn(n, c, device="cuda", dtype=torch.bfloat16) for c in (1024, 1024, 6144)]
        assert all(torch.equal(g, e) for g, e in zip(compiled(*args), layer(*args))), n
