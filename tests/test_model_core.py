"""Model config validation, model directories, the contiguous cache and generation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from astrai_train.model import ConfigError, ModelConfig, Transformer, generate, kv_layout, presets
from astrai_train.model.kv_cache import ContiguousKVCache


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=257, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=96, max_len=96,
                init_std=0.3)
    base.update(kw)
    return ModelConfig(**base)


MLA = dict(attention="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def test_presets_load_and_1b_shape():
    assert {"tiny", "125m", "qwen3-0.6b", "1b", "mla-tiny"} <= set(presets())
    q = ModelConfig.from_preset("qwen3-0.6b")
    assert (q.vocab_size, q.dim, q.n_layers, q.n_heads, q.n_kv_heads, q.resolved_head_dim, q.dim_ffn) == \
        (151936, 1024, 28, 16, 8, 128, 3072)
    assert q.tie_weight and q.use_qk_norm and q.rope_theta == 1e6
    b = ModelConfig.from_preset("1b")
    assert (b.vocab_size, b.dim, b.n_layers, b.n_heads, b.n_kv_heads, b.resolved_head_dim, b.dim_ffn,
            b.tie_weight, b.norm_eps, b.max_len) == (100000, 1536, 24, 24, 4, 64, 6912, False, 1e-5, 32768)
    with torch.device("meta"):
        assert 2.5e6 < Transformer(ModelConfig.from_preset("tiny")).num_parameters() < 6e6


@pytest.mark.parametrize("kw,field", [
    (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (dict(dim=66, n_heads=4), "dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(attention="sparse"), "attention"),
    (dict(attention="mla", kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8), "kv_lora_rank"),
    (dict(head_dim=7), "head_dim"),
])
def test_impossible_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=rf"\b{field}="):
        _cfg(**kw)


def test_unknown_key_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dim": 64, "n_layer": 2}))
    with pytest.raises(ConfigError, match="unknown model config key 'n_layer'"):
        ModelConfig.from_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        Transformer.from_pretrained(tmp_path / "nope")
    _cfg().save(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        Transformer.from_pretrained(tmp_path / "noweights")
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")


def test_save_load_roundtrip_and_sharding(tmp_path):
    torch.manual_seed(0)
    m = Transformer(_cfg(tie_weight=False)).eval()
    m.save_pretrained(tmp_path / "one")
    m.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        ref = m(ids)
        for d in ("one", "sharded"):
            assert torch.equal(Transformer.from_pretrained(tmp_path / d)(ids), ref)
        half = Transformer.from_pretrained(tmp_path / "one", dtype=torch.bfloat16)
        assert half.embed_tokens.weight.dtype == torch.bfloat16


def test_mismatched_weights_fail_clearly(tmp_path):
    Transformer(_cfg()).save_pretrained(tmp_path / "m")
    _cfg(dim_ffn=128).save(tmp_path / "m")
    with pytest.raises(ValueError, match="mlp.*shape"):
        Transformer.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kw", [dict(), dict(use_qk_norm=True, use_gated_attention=True), MLA,
                                dict(MLA, use_gated_attention=True)])
def test_cached_generation_equals_full_recompute(kw):
    torch.manual_seed(0)
    m = Transformer(_cfg(**kw)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], list(range(20, 43))]
    out = generate(m, prompts, max_new_tokens=12)
    for p, o in zip(prompts, out):
        seq = list(p)
        with torch.no_grad():
            for _ in range(12):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq[len(p):]
    assert len(set(out[2])) > 1  # a real sequence, not one token repeated


def test_flat_forward_matches_training_forward_for_mla_absorbed_form():
    torch.manual_seed(3)
    m = Transformer(_cfg(**MLA)).eval()
    ids = torch.randint(0, 257, (1, 17))
    cache = ContiguousKVCache(m.config, 1, 32)
    with torch.no_grad():
        h = m.forward_flat(ids[0], torch.arange(17), cache.step(torch.zeros(17, dtype=torch.long), torch.arange(17)))
        assert torch.allclose(m.compute_logits(h), m(ids)[0], atol=1e-4, rtol=1e-4)
    # The cache keeps latent + rotary key only: 32 + 8 channels, one "head", no values.
    assert cache.v is None and cache.k.shape[-2:] == (1, 40)


def test_mla_cache_is_smaller_than_gqa():
    gqa, mla = ModelConfig.from_preset("tiny"), ModelConfig.from_preset("mla-tiny")
    b_gqa = kv_layout(gqa).bytes_per_token(gqa.n_layers, torch.bfloat16)
    b_mla = kv_layout(mla).bytes_per_token(mla.n_layers, torch.bfloat16)
    assert (b_gqa, b_mla) == (2048, 640)


def test_generate_rejects_bad_input():
    m = Transformer(_cfg()).eval()
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(m, [[]], 3)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(m, [[1]], -1)


def test_export_hf_cli(tmp_path):
    Transformer(_cfg(use_qk_norm=True)).save_pretrained(tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "astrai_train.cli", "export-hf", str(tmp_path / "m"),
                        str(tmp_path / "hf")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Qwen3ForCausalLM" in r.stdout
    r = subprocess.run([sys.executable, "-m", "astrai_train.cli", "export-hf", str(tmp_path / "missing"),
                        str(tmp_path / "hf2")], capture_output=True, text=True)
    assert r.returncode != 0 and "model directory not found" in r.stderr and "Traceback" not in r.stderr
