"""Fused q/k/v and gate/up projections: same outputs, same parameters, shared storage."""
from __future__ import annotations

import torch

from astrai_train.model import ModelConfig, Transformer, fuse_projections


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=48, max_len=64,
               init_std=0.3, use_qk_norm=True)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg))


def test_fused_inference_matches_and_keeps_parameters(one_thread):
    model = _model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
    names = [n for n, _ in model.named_parameters()]
    total = model.num_parameters()
    assert fuse_projections(model) == 4          # 2 layers x (q/k/v + gate/up)
    assert [n for n, _ in model.named_parameters()] == names and model.num_parameters() == total
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()     # views, not copies
    assert mlp.up_proj.weight.data_ptr() > mlp.gate_up_weight.data_ptr()
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert fuse_projections(model) == 0          # idempotent


def test_updating_a_view_updates_the_fused_matmul(one_thread):
    model = _model()
    fuse_projections(model)
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(ids)
        model.layers[1].self_attn.v_proj.weight.mul_(3.0)
        model.layers[0].mlp.up_proj.weight.zero_()
        after = model(ids)
        unfused = _model()
        unfused.load_state_dict(model.state_dict())
        expected = unfused(ids)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_training_still_reaches_every_parameter(one_thread):
    model = _model()
    fuse_projections(model)
    loss = model(torch.randint(0, 97, (2, 8))).float().logsumexp(-1).mean()
    loss.backward()
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_mla_layers_are_left_alone(one_thread):
    model = _model(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                   use_qk_norm=False)
    assert fuse_projections(model) == 2          # only the two MLPs
    assert model.layers[0].self_attn.q_proj.weight.is_leaf
