"""Parity with Hugging Face transformers in both directions (fp32, relative error < 1e-4)."""
from __future__ import annotations

import json

import pytest
import torch

from astrai_train.model import ConfigError, ModelConfig, Transformer
from astrai_train.model.hf_export import export_hf

transformers = pytest.importorskip("transformers")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, dim_ffn=96,
                max_len=128, rope_theta=10000.0, init_std=0.1, use_qk_norm=True, tie_weight=True)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw,arch", [
    (dict(), "Qwen3ForCausalLM"),
    (dict(tie_weight=False, rope_theta=1e6), "Qwen3ForCausalLM"),
    (dict(use_qk_norm=False, tie_weight=False), "LlamaForCausalLM"),
])
def test_export_loads_in_transformers_with_same_logits(tmp_path, kw, arch):
    torch.manual_seed(0)
    ours = Transformer(_tiny(**kw)).eval()
    ours.save_pretrained(tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) == (not ours.config.tie_weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, 320, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert _rel_err(got, ref) < 1e-4


def test_hf_qwen3_directory_loads_into_ours(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=256, rope_theta=50000.0, tie_word_embeddings=True,
                                   initializer_range=0.1)
    torch.manual_seed(1)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "qwen3")
    ours = Transformer.from_pretrained(tmp_path / "qwen3")
    assert ours.config.use_qk_norm and ours.config.tie_weight and ours.config.n_kv_heads == 1
    ids = torch.randint(0, 300, (3, 29))
    with torch.no_grad():
        assert _rel_err(ours(ids), hf(ids).logits) < 1e-4


def test_hf_llama_directory_loads_into_ours(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = Transformer.from_pretrained(tmp_path / "llama")
    assert not ours.config.use_qk_norm and not ours.config.tie_weight
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        assert _rel_err(ours(ids), hf(ids).logits) < 1e-4


@pytest.mark.parametrize("kw,field", [(dict(use_gated_attention=True), "use_gated_attention"),
                                      (dict(attention="mla", use_qk_norm=False, kv_lora_rank=16,
                                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8), "mla")])
def test_unexportable_variants_are_refused(tmp_path, kw, field):
    Transformer(_tiny(**kw)).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match=field):
        export_hf(tmp_path / "m", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
