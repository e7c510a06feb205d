"""Mixture-of-experts families as options of one Transformer: Qwen3-MoE (top-k of a softmax
router, `norm_topk_prob` on or off, dense layers by `mlp_only_layers` / `decoder_sparse_step`)
and Mixtral (top-2, always renormalised).

For each: a tiny random-weight `transformers` model saved with save_pretrained (per-expert
tensors) loads into ours with fp32 logits within 1e-4, its training gradients match HF's, greedy
generation through the serving engine (paged + prefix cache, chunked prefill; the torch ops and
FusedOps) equals HF `generate`, and `export_hf` gives a directory HF loads to the same logits.
The 3-D fused expert layout transformers 5 holds in memory loads too. Every MoE option we do not
reproduce is refused by name. The Triton grouped GEMM is checked under the interpreter in
tests/test_kernels_triton_cpu.py; on a GPU here (`-m gpu`), also inside a CUDA graph.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from astrai_serve.engine import LLMEngine, SamplingParams
from astrai_serve.kernels.fused_ops import FUSED_OPS
from astrai_serve.kernels.triton_moe import align, check_moe_args
from astrai_train.model import ConfigError, ModelConfig, Transformer, fuse_projections
from astrai_train.model.hf import config_from_hf
from astrai_train.model.hf_export import export_hf
from astrai_train.model.inference_ops import TORCH_OPS
from astrai_train.model.moe import MoE, experts_dense, experts_reference, route

from hf_parity_support import assert_engine_matches_hf_generate  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.5, max_position_embeddings=256, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
FAMILIES = {
    # Qwen3-30B-A3B's routing (norm_topk_prob true), a dense first layer, explicit head_dim
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                                         norm_topk_prob=True, mlp_only_layers=[0], head_dim=16)),
    # the class defaults' routing (no renormalisation), top-3, every second layer sparse
    "qwen3_moe-step2": ("Qwen3MoeConfig", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32,
                                               norm_topk_prob=False, decoder_sparse_step=2)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _hf_model(name: str):
    cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**SHAPE, **kw)).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its save_pretrained directory, ours loaded from it)."""
    hf = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, directory, Transformer.from_pretrained(directory)


def test_logits_match_hf(family):
    name, hf, _, ours = family
    cfg, hc = ours.config, hf.config
    assert cfg.n_experts == hc.num_local_experts and cfg.n_experts_per_token == hc.num_experts_per_tok
    assert cfg.moe_norm_topk == (name != "qwen3_moe-step2") and cfg.use_qk_norm == name.startswith("qwen3")
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]
    assert [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)] == sparse
    ids = _ids(150, batch=2)
    with torch.no_grad():
        assert _rel_err(ours(ids), hf(ids).logits) < 1e-4


def test_training_gradients_match_hf(family):
    """A forward + backward of the training path (experts_reference, autograd through the sort
    and index_add) gives HF's gradients for the router and the stacked experts."""
    name, hf, directory, _ = family
    ours = Transformer.from_pretrained(directory).train()
    hf.train()
    try:
        ids = _ids(40, batch=2, seed=5)
        ours(ids).logsumexp(-1).mean().backward()
        hf(ids).logits.logsumexp(-1).mean().backward()
        layer = next(i for i in range(ours.config.n_layers) if ours.config.is_moe_layer(i))
        mine, theirs = ours.layers[layer].mlp, hf.model.layers[layer].mlp
        assert isinstance(mine, MoE)
        for a, b in ((mine.gate.weight, theirs.gate.weight),
                     (mine.experts.gate_up_proj, theirs.experts.gate_up_proj),
                     (mine.experts.down_proj, theirs.experts.down_proj)):
            assert a.grad is not None and a.grad.abs().sum() > 0
            assert _rel_err(a.grad, b.grad) < 1e-4
    finally:
        hf.eval()
        hf.zero_grad(set_to_none=True)


@pytest.mark.parametrize("ops", ["torch", "fused"])
def test_engine_greedy_matches_hf_generate(family, ops):
    """Paged KV + prefix cache + chunked prefill through the model's MoE forward_flat == HF generate."""
    _, hf, directory, _ = family
    assert_engine_matches_hf_generate(hf, directory, VOCAB, prefix_len=70, max_tokens=10, num_pages=96,
                                      max_num_batched_tokens=32, fused_kernels=ops == "fused")


def test_export_round_trips_to_identical_logits(family, tmp_path):
    _, hf, directory, ours = family
    out = export_hf(directory, tmp_path / "hf")
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == [type(hf).__name__]
    # the names save_pretrained writes: one tensor per expert and projection
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert keys == set(f.keys())
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    again = Transformer.from_pretrained(out)
    assert again.config == ours.config
    ids = _ids(120, batch=2, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert torch.equal(again(ids), ours(ids))


def test_fused_3d_expert_layout_loads(tmp_path):
    """transformers 5's in-memory names (experts.gate_up_proj [E, 2I, D], down_proj [E, D, I])."""
    hf = _hf_model("mixtral")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf.config.to_json_file(tmp_path / "config.json")
    ids = _ids(50, batch=2, seed=7)
    with torch.no_grad():
        assert _rel_err(Transformer.from_pretrained(tmp_path)(ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("change,match", [
    (dict(num_local_experts=3), "weights for expert 3, but config.json says 3 experts"),
    (dict(num_local_experts=5), "none for expert 4's gate projection"),
])
def test_expert_count_must_match_the_weights(tmp_path, change, match):
    _hf_model("mixtral").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, **change}))
    with pytest.raises(ValueError, match=re.escape(match)):
        Transformer.from_pretrained(tmp_path)


def _native(**kw) -> Transformer:
    base = dict(vocab_size=VOCAB, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, dim_ffn=96,
                max_len=256, init_std=0.3, tie_weight=False, n_experts=4, n_experts_per_token=2, moe_dim_ffn=32)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("kw,arch", [
    (dict(use_qk_norm=True, moe_norm_topk=False, moe_dense_layers=(0, 2)), "Qwen3MoeForCausalLM"),
    (dict(use_qk_norm=True, tie_weight=True, rope_type="linear", rope_factor=2.0), "Qwen3MoeForCausalLM"),
    (dict(n_experts_per_token=1), "MixtralForCausalLM"),
])
def test_astrai_moe_exports_to_stock_class(tmp_path, kw, arch):
    ours = _native(**kw)
    ours.save_pretrained(tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = _ids(100, batch=2, seed=4)
    with torch.no_grad():
        assert _rel_err(ours(ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("kw,field", [
    (dict(qkv_bias=True), "qkv_bias"),
    (dict(moe_norm_topk=False), "moe_norm_topk"),
    (dict(moe_dense_layers=(1,)), "moe_dense_layers"),
])
def test_moe_without_a_stock_class_is_not_exported(tmp_path, kw, field):
    _native(**kw).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=field):
        export_hf(tmp_path / "m", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _hf_dict(model_type: str, **kw) -> dict:
    data = dict(model_type=model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    data.update(kw)
    return data


@pytest.mark.parametrize("data,field", [
    (_hf_dict("qwen2_moe"), "model_type 'qwen2_moe'"),
    (_hf_dict("deepseek_v3"), "model_type 'deepseek_v3'"),
    (_hf_dict("qwen3_moe", shared_expert_intermediate_size=64), "shared_expert_intermediate_size=64"),
    (_hf_dict("mixtral", n_shared_experts=1), "n_shared_experts=1"),
    (_hf_dict("mixtral", router_jitter_noise=0.01), "router_jitter_noise=0.01"),
    (_hf_dict("mixtral", sliding_window=4096), "sliding_window=4096"),
    (_hf_dict("qwen3_moe", use_sliding_window=True, sliding_window=64), "use_sliding_window=True"),
    (_hf_dict("qwen3_moe", attention_bias=True), "attention_bias=True"),
    (_hf_dict("qwen3_moe", num_experts=8, num_local_experts=4), "num_experts=8"),
    (_hf_dict("qwen3_moe", num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (_hf_dict("qwen3_moe", num_experts=4, decoder_sparse_step=0), "decoder_sparse_step=0"),
    (_hf_dict("mixtral", hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_unsupported_moe_options_are_refused_by_name(data, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        config_from_hf(data)


def test_moe_defaults_follow_transformers_classes():
    # Qwen3MoeConfig: 128 experts, top-8, width 768, no renormalisation, head_dim hidden // heads
    q = config_from_hf({k: v for k, v in _hf_dict("qwen3_moe").items() if k != "num_key_value_heads"})
    assert (q.n_experts, q.n_experts_per_token, q.moe_dim_ffn, q.moe_norm_topk) == (128, 8, 768, False)
    assert q.head_dim == 16 and q.n_kv_heads == 4 and q.moe_dense_layers == ()
    # MixtralConfig: 8 experts, top-2, rope_theta 1e6, eps 1e-5
    m = config_from_hf(_hf_dict("mixtral"))
    assert (m.n_experts, m.n_experts_per_token, m.moe_dim_ffn, m.moe_norm_topk) == (8, 2, None, True)
    assert m.rope_theta == 1e6 and m.norm_eps == 1e-5 and not m.use_qk_norm
    # a Qwen3-MoE config with no sparse layer is the dense Qwen3 shape
    assert config_from_hf(_hf_dict("qwen3_moe", num_experts=0)).n_experts == 0
    assert config_from_hf(_hf_dict("qwen3_moe", mlp_only_layers=[0, 1])).n_experts == 0


@pytest.mark.parametrize("kw,field", [
    (dict(n_experts_per_token=4), "n_experts_per_token"),       # no effect without experts
    (dict(moe_dense_layers=[0]), "moe_dense_layers"),
    (dict(n_experts=-1), "n_experts"),
    (dict(n_experts=4, n_experts_per_token=5), "n_experts_per_token"),
    (dict(n_experts=4, moe_dense_layers=[4]), "moe_dense_layers"),
    (dict(n_experts=4, moe_dense_layers=[1, 0]), "moe_dense_layers"),
    (dict(n_experts=4, moe_dense_layers=[0, 1, 2, 3]), "moe_dense_layers"),
    (dict(n_experts=4, moe_dim_ffn=0), "moe_dim_ffn"),
])
def test_model_config_validates_moe(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kw)


def test_moe_config_round_trips_through_json(tmp_path):
    config = ModelConfig(n_experts=4, moe_dense_layers=[0, 2], moe_dim_ffn=64)
    assert config.moe_dense_layers == (0, 2)
    config.save(tmp_path)
    assert ModelConfig.from_json(tmp_path) == config


def test_align_groups_pairs_by_expert_in_padded_blocks():
    g = torch.Generator().manual_seed(0)
    for n, k, e, block in ((1, 2, 8, 16), (37, 2, 6, 16), (50, 4, 4, 8), (3, 3, 64, 16)):
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
        rows, block_expert = align(ids, e, block)
        assert rows.numel() % block == 0 and block_expert.numel() == rows.numel() // block
        real = rows[rows < n * k]
        assert sorted(real.tolist()) == list(range(n * k))           # every pair once
        flat = ids.reshape(-1)
        for b, expert in enumerate(block_expert.tolist()):
            chunk = rows[b * block:(b + 1) * block]
            chunk = chunk[chunk < n * k]
            if expert == e:
                assert chunk.numel() == 0                              # past the end: padding only
            else:
                assert (flat[chunk.long()] == expert).all()
        counts = torch.bincount(flat, minlength=e)
        used = int(((counts + block - 1) // block).sum())
        assert (block_expert[:used] < e).all() and (block_expert[used:] == e).all()


def test_dense_fallback_and_ops_equal_the_reference():
    """The capturable all-experts path, and TORCH_OPS / FUSED_OPS (its CPU body), == the reference."""
    torch.manual_seed(0)
    moe = MoE(32, 24, n_experts=6, top_k=2, normalize=False)
    moe.experts.reset_parameters(0.3, 0.3)
    x = torch.randn(11, 32)
    with torch.no_grad():
        want = moe(x)
        weights, ids = route(moe.gate(x), 2, False)
        dense = experts_dense(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
        torch.testing.assert_close(dense, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(experts_reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids), want)
        assert torch.equal(moe.forward_flat(x, TORCH_OPS), want)
        assert torch.equal(moe.forward_flat(x, FUSED_OPS), want)


def test_moe_kernel_rejects_bad_arguments():
    x, gu, down = torch.randn(3, 16), torch.randn(4, 16, 16), torch.randn(4, 16, 8)
    w, ids = torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int64)
    check_moe_args(x, gu, down, w, ids)
    with pytest.raises(ValueError, match=r"down must be \[E, D, I\]"):
        check_moe_args(x, gu, torch.randn(4, 8, 16), w, ids)
    with pytest.raises(ValueError, match="weights must be float32"):
        check_moe_args(x, gu, down, w.double(), ids)
    with pytest.raises(ValueError, match="ids must be int64"):
        check_moe_args(x, gu, down, w, ids.int())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_reference_and_captures(dtype):
    """Qwen3-30B-A3B-like expert shapes: the Triton path (FusedOps) vs the torch reference, eager
    and replayed from a CUDA graph (no host sync inside)."""
    from astrai_serve.kernels.triton_moe import moe_experts

    torch.manual_seed(0)
    e, d, i, k = 16, 512, 256, 4
    moe = MoE(d, i, n_experts=e, top_k=k, normalize=True).to("cuda", dtype)
    moe.experts.reset_parameters(d ** -0.5, i ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        for n in (1, 3, 64, 500):
            x = torch.randn(n, d, device="cuda", dtype=dtype)
            weights, ids = route(moe.gate(x), k, True)
            want = experts_reference(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
            got = moe_experts(x, moe.experts.gate_up_proj, moe.experts.down_proj, weights, ids)
            assert _rel_err(got.float(), want.float()) < tol
        x = torch.randn(4, d, device="cuda", dtype=dtype)
        eager = moe.forward_flat(x, FUSED_OPS)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            moe.forward_flat(x, FUSED_OPS)            # warm-up: Triton compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = moe.forward_flat(x, FUSED_OPS)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.testing.assert_close(out, moe.forward_flat(x, FUSED_OPS), rtol=0, atol=0)
        assert not torch.equal(out, eager)


@pytest.mark.gpu
def test_gpu_engine_greedy_with_graphs_and_one_sync_per_step(family):
    """The engine's GPU defaults (Triton attention, FusedOps' grouped GEMMs, CUDA graphs for
    decode) == a greedy recompute with the training forward, and a step reads back only its
    sampled ids (the MoE layers add no host sync)."""
    import warnings

    _, _, directory, _ = family
    model = Transformer.from_pretrained(directory, device="cuda")
    engine = LLMEngine.from_model(model, None, num_pages=64, page_size=16, compile_decode=False)
    assert engine.config.resolved_fused_kernels() and engine.config.resolved_cuda_graphs()
    prompts = [_ids(n, seed=n)[0].tolist() for n in (3, 17, 40, 9)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0.0))
    engine.step()           # warm-up: Triton compiles
    torch.cuda.synchronize()
    done, steps = {}, 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            while engine.has_unfinished_requests():
                done.update({o.request_id: o for o in engine.step() if o.finished})
                steps += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert steps > 0 and len(syncs) <= steps, [str(w.message) for w in syncs][:5]
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            ids = list(prompt)
            for _ in range(8):
                ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
            assert done[f"r{i}"].token_ids == ids[len(prompt):]
