"""astrai::rms_norm, astrai::add_rms_norm and astrai::silu_mul on a CPU (triton_norm.py): the ops'
torch path is the model's math bit for bit, they trace as one node each, bad shapes are refused.

The Triton kernels themselves run under the interpreter in tests/test_kernels_triton_cpu.py and
on a GPU in tests/test_kernels_gpu.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from astrai_serve.kernels.triton_norm import (INTERPRET, add_rms_norm, add_rms_norm_op, rms_norm_op,
                                              silu_mul)
from astrai_train.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(INTERPRET, reason="TRITON_INTERPRET=1: the ops launch the interpreted kernels")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ops_on_cpu_are_the_models_math_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(1000, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(1000))
    for n in (0, 1, 7):
        wide = torch.randn(n, 1200, dtype=dtype) * 3
        x, res = wide[:, :1000], torch.randn(n, 1000, dtype=dtype)     # x: rows of a wider tensor
        with torch.no_grad():
            normed, r = add_rms_norm(x, None, norm.weight, norm.eps)
            assert r is x and torch.equal(normed, norm(x))
            normed, r = add_rms_norm(x, res, norm.weight, norm.eps)
            assert torch.equal(r, x + res) and torch.equal(normed, norm(x + res))
            assert normed.dtype == r.dtype == dtype and normed.is_contiguous()
        gate_up = torch.randn(n, 2 * 96, dtype=dtype) * 4
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.equal(silu_mul(gate_up), F.silu(gate) * up)


def test_ops_trace_as_one_node_each() -> None:
    """fullgraph torch.compile (aot_eager: no C++ compiler needed) sees one call per op and gives eager's bits."""
    graphs = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def layer(h: torch.Tensor, res: torch.Tensor, w: torch.Tensor, gate_up: torch.Tensor):
        normed, res = add_rms_norm(h * 1.5, res, w, 1e-6)
        first, _ = add_rms_norm(h, None, w, 1e-6)
        return normed + first, res, silu_mul(gate_up)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=record)
    args = torch.randn(3, 64), torch.randn(3, 64), torch.rand(64) + 0.5, torch.randn(3, 48)
    got, want = compiled(*args), layer(*args)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    targets = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    for op in (torch.ops.astrai.add_rms_norm.default, torch.ops.astrai.rms_norm.default,
               torch.ops.astrai.silu_mul.default):
        assert targets.count(op) == 1, targets


@pytest.mark.parametrize("op, args", [
    (add_rms_norm_op, lambda: (torch.randn(3, 64), torch.randn(3, 64), torch.rand(64), 1e-6)),
    (rms_norm_op, lambda: (torch.randn(3, 64, dtype=torch.bfloat16), torch.rand(64).bfloat16(), 1e-6)),
    (silu_mul, lambda: (torch.randn(5, 96),)),
])
def test_ops_pass_torch_opcheck(op, args) -> None:
    """Schema, fake shapes against the real outputs (no aliasing), AOT dispatch with dynamic shapes."""
    torch.library.opcheck(op, args())


_BAD_NORM_ARGS = [
    ({"x": torch.randn(3, 4, 16)}, r"x must be \[N, D\] with 1 <= D <= 32768; got x \(3, 4, 16\)"),
    ({"x": torch.randn(3, 0)}, r"x must be \[N, D\].*got x \(3, 0\)"),
    ({"x": torch.ones(3, 16, dtype=torch.int64)}, "x must be floating point; got torch.int64"),
    ({"weight": torch.ones(8)}, r"weight must be \[D\] with D=16 in x's dtype torch.float32; got weight \(8,\)"),
    ({"weight": torch.ones(16, dtype=torch.bfloat16)}, r"weight must be \[D\].*got weight \(16,\) torch.bfloat16"),
]
_BAD_RESIDUALS = [
    ({"residual": torch.randn(2, 16)}, r"residual must match x \(3, 16\) torch.float32; got residual \(2, 16\)"),
    ({"residual": torch.randn(3, 16).bfloat16()}, r"residual must match x.*got residual \(3, 16\) torch.bfloat16"),
]


@pytest.mark.parametrize("bad, match", [({**b, "residual": None}, m) for b, m in _BAD_NORM_ARGS]
                         + _BAD_NORM_ARGS + _BAD_RESIDUALS)
def test_add_rms_norm_rejects_bad_arguments(bad: dict, match: str) -> None:
    """Checked before any launch, with and without a residual (the two ops behind add_rms_norm)."""
    x = bad.get("x", torch.randn(3, 16))
    args = {"x": x, "residual": torch.randn(x.shape).to(x.dtype), "weight": torch.ones(16), "eps": 1e-6}
    with pytest.raises(ValueError, match=match):
        add_rms_norm(**{**args, **bad})


@pytest.mark.parametrize("gate_up, match", [
    (torch.randn(3, 15), r"gate_up must be \[N, 2K\] \(gate \| up\); got gate_up \(3, 15\)"),
    (torch.randn(2, 3, 16), r"gate_up must be \[N, 2K\].*got gate_up \(2, 3, 16\)"),
    (torch.ones(3, 16, dtype=torch.int32), "gate_up must be floating point; got torch.int32"),
])
def test_silu_mul_rejects_bad_arguments(gate_up: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        silu_mul(gate_up)
