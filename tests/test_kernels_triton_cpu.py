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


def test_interpreted_moe_grouped_gemm_matches_reference() -> None:
    # The two grouped GEMMs over expert-sorted, block-padded rows (gate|up with silu * up in the
    # epilogue, down with the routing weight): fp32 and fp16, decode (1 token), dims off every
    # block multiple, experts with no token, an expert over several blocks, k = E, strided x,
    # no tokens; each case against moe.experts_reference and with its two launches counted.
    proc = interpreted("astrai_serve.kernels.triton_moe")
    assert proc.returncode == 0 and "kernel == reference" in proc.stdout, proc.stderr[-3000:]


FUSED_MOE = """
import torch
from astrai_serve.kernels import triton_moe
from astrai_serve.kernels.fused_ops import FUSED_OPS
from astrai_train.model.moe import MoE
torch.manual_seed(0)
moe = MoE(48, 40, n_experts=6, top_k=2, normalize=True)
moe.experts.reset_parameters(0.2, 0.2)
x = torch.randn(13, 48)
with torch.no_grad():
    got, want = moe.forward_flat(x, FUSED_OPS), moe(x)
assert triton_moe.launches == 2, triton_moe.launches
err = float((got - want).norm() / want.norm())
assert err < 1e-5, err
print("fused moe == forward")
"""


def test_interpreted_fused_ops_moe_launches_the_grouped_gemm() -> None:
    # The wiring: a model MoE layer's forward_flat through FusedOps (router, top-k, the op) runs
    # the two kernels and equals the training forward.
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", FUSED_MOE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "fused moe == forward" in proc.stdout, proc.stderr[-3000:]


def test_interpreted_qk_norm_rope_kernel_matches_torch() -> None:
    # float32, q/k strided views of one fused qkv (and channel-strided ones), N=1/5/3,
    # H/Hkv 16/8 and 4/4, D 128 and 64; the kernel itself, not the op's CPU path.
    proc = interpreted("astrai_serve.kernels.triton_qk_norm_rope")
    assert proc.returncode == 0 and "kernel == torch" in proc.stdout, proc.stderr[-3000:]


def test_interpreted_norm_kernels_match_torch() -> None:
    # add_rms_norm (N 1/3/17 x D 64/1000/1024, with and without a residual) and silu_mul (K 64,
    # 96, 3072), fp32/bf16/fp16, called through the ops: each case launched its Triton kernel.
    from astrai_serve.kernels.triton_norm import within_tolerance

    proc = interpreted("astrai_serve.kernels.triton_norm", "--json")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    cases = {(r["op"], r["dtype"], r["n"], r["d"], r["residual"]) for r in results}
    want = {("rms_norm", t, n, d, res) for t in ("float32", "bfloat16", "float16") for n in (1, 3, 17)
            for d in (64, 1000, 1024) for res in (False, True)}
    want |= {("silu_mul", t, n, k, False) for t in ("float32", "bfloat16", "float16") for n in (1, 3, 17)
             for k in (64, 96, 3072)}
    assert cases == want
    assert all(r["interpreted"] for r in results)
    bad = [r for r in results if not within_tolerance(r)]
    assert not bad, bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_op_equals_the_models_qkv(dtype: torch.dtype) -> None:
    """The op's CPU path on the raw (unnormed) q/k views of a fused projection == GQAAttention._qkv."""
    import torch.nn.functional as F

    from astrai_serve.kernels.triton_qk_norm_rope import qk_norm_rope
    from astrai_train.model import ModelConfig, Transformer, fuse_projections

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, dim_ffn=96,
                      max_len=64, init_std=0.3, use_qk_norm=True)
    model = Transformer(cfg).to(dtype)
    fuse_projections(model)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        attn.q_norm.weight.copy_(1 + 0.3 * torch.randn(32))       # not all ones
        attn.k_norm.weight.copy_(1 + 0.3 * torch.randn(32))
        x = torch.randn(7, 64, dtype=dtype)
        pos = torch.tensor([0, 3, 9, 10, 11, 40, 63])
        cos, sin = model.rope_cos[pos], model.rope_sin[pos]
        want_q, want_k, _ = attn._qkv(x, cos, sin)
        q_raw, k_raw, _ = F.linear(x, attn.qkv_weight).split([4 * 32, 2 * 32, 2 * 32], dim=-1)
        q, k = qk_norm_rope(q_raw.view(7, 4, 32), k_raw.view(7, 2, 32), attn.q_norm.weight,
                            attn.k_norm.weight, cos, sin, attn.q_norm.eps)
    assert q.is_contiguous() and k.is_contiguous() and q.dtype == k.dtype == dtype
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def test_qk_norm_rope_op_traces_as_one_node() -> None:
    """fullgraph torch.compile (aot_eager: no C++ compiler needed) over the fake shapes == eager."""
    from astrai_serve.kernels.triton_qk_norm_rope import qk_norm_rope

    qkv = torch.randn(3, (4 + 2 * 2) * 16)
    q, k = qkv[:, :64].view(3, 4, 16), qkv[:, 64:96].view(3, 2, 16)
    w_q, w_k, cos, sin = torch.rand(16) + 0.5, torch.rand(16) + 0.5, torch.rand(3, 16), torch.rand(3, 16)
    fn = torch.compile(lambda *a: qk_norm_rope(*a, 1e-6), fullgraph=True, backend="aot_eager")
    got, want = fn(q, k, w_q, w_k, cos, sin), qk_norm_rope(q, k, w_q, w_k, cos, sin, 1e-6)
    assert all(torch.equal(g, w) and g.is_contiguous() for g, w in zip(got, want))
    assert [tuple(t.shape) for t in got] == [(3, 4, 16), (3, 2, 16)]


@pytest.mark.parametrize("bad, match", [
    ({"q": torch.randn(3, 64)}, r"q must be \[N,H,D\] and k \[N,Hkv,D\]; got q \(3, 64\)"),
    ({"k": torch.randn(2, 2, 16)}, r"must share N and D; got q \(3, 4, 16\) and k \(2, 2, 16\)"),
    ({"k": torch.randn(3, 2, 8)}, r"must share N and D; got q \(3, 4, 16\) and k \(3, 2, 8\)"),
    ({"q": torch.randn(3, 4, 15), "k": torch.randn(3, 2, 15)}, r"D must be even.*\(3, 4, 15\)"),
    ({"k": torch.randn(3, 2, 16, dtype=torch.bfloat16)}, "share a floating dtype; got torch.float32 and torch.bfloat16"),
    ({"q_weight": torch.ones(8)}, r"q_weight must be a floating \[D\] with D=16; got \(8,\)"),
    ({"k_weight": torch.ones(1, 16)}, r"k_weight must be a floating \[D\] with D=16; got \(1, 16\)"),
    ({"cos": torch.ones(1, 16)}, r"cos must be a floating \[N, D\] with N=3, D=16; got \(1, 16\)"),
    ({"sin": torch.ones(3, 16, dtype=torch.int64)}, r"sin must be a floating \[N, D\].*torch.int64"),
])
def test_qk_norm_rope_rejects_bad_arguments(bad: dict, match: str) -> None:
    from astrai_serve.kernels.triton_qk_norm_rope import qk_norm_rope

    args = {"q": torch.randn(3, 4, 16), "k": torch.randn(3, 2, 16), "q_weight": torch.ones(16),
            "k_weight": torch.ones(16), "cos": torch.ones(3, 16), "sin": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match=match):
        qk_norm_rope(**{**args, **bad}, eps=1e-6)


def test_decode_ops_silu_mul_linear_equals_torch() -> None:
    """DecodeOps.silu_mul_linear through astrai::gemv_silu_mul's CPU path (and past MAX_ROWS, F.linear)
    == F.linear(F.silu(gate) * up, w); a gate_up that is not [.., 2K] for w [N, K] says so."""
    import torch.nn.functional as F

    from astrai_serve.kernels.decode_matmul import DecodeOps

    w = torch.randn(7, 24)
    for rows in (1, 3, 4, 6):
        gate_up = torch.randn(rows, 48)
        gate, up = gate_up.chunk(2, dim=-1)
        for pdl in (False, True):                                   # no launch on a CPU: pdl changes nothing
            assert torch.equal(DecodeOps(pdl=pdl).silu_mul_linear(gate_up, w), F.linear(F.silu(gate) * up, w))
    with pytest.raises(ValueError, match=r"silu_mul_linear takes gate_up \[\.\.\., 2K\] and w \[N, K\]; got \(2, 40\) and \(7, 24\)"):
        DecodeOps().silu_mul_linear(torch.randn(2, 40), w)


def test_rope_qk_op_is_the_models_rotary_on_a_cpu() -> None:
    """rope_qk (FusedOps' rotary for models without QK-norm): on a CPU the model's apply_rope, and
    bad shapes are refused by name."""
    from astrai_serve.kernels.triton_qk_norm_rope import rope_qk
    from astrai_train.model.layers import apply_rope, rope_tables

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    cos, sin = (t[torch.tensor([0, 3, 9, 2, 7])] for t in rope_tables(16, 32, 1e4))
    got_q, got_k = rope_qk(q, k, cos, sin)
    assert torch.equal(got_q, apply_rope(q, cos, sin)) and torch.equal(got_k, apply_rope(k, cos, sin))
    with pytest.raises(ValueError, match=r"cos must be a floating \[N, D\] with N=5, D=16; got \(5, 8\)"):
        rope_qk(q, k, cos[:, :8], sin)
