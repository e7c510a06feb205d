"""Hugging Face model families as options of one Transformer: Llama 3.x RoPE scaling (llama3,
linear, yarn), tied embeddings, Qwen2's q/k/v biases, Qwen3 + YaRN, Mistral without a window.

For each: a tiny random-weight `transformers` model saved with save_pretrained loads into ours
with fp32 logits within 1e-4 (prompts run past the original context the scaling stretches),
greedy generation through the serving engine (fused q/k/v, paged + prefix cache, chunked
prefill) equals HF `generate`, and `export_hf` gives back a directory HF loads to the very same
logits. Every config option we do not reproduce is refused with its name; docs/models.md's
table lists exactly the model types the importer accepts.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from astrai_train.model import ConfigError, ModelConfig, Transformer, fuse_projections
from astrai_train.model.hf import SUPPORTED_MODEL_TYPES, config_from_hf
from astrai_train.model.hf_export import export_hf
from astrai_train.model.layers import rope_tables

from hf_parity_support import assert_engine_matches_hf_generate  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
# Tiny shapes; init 0.5 gives a random model clear argmax margins (see engine_support.py).
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
ORIGINAL = 64   # the "pretraining" context the scaled families stretch; prompts below run to ~200

FAMILIES = {
    # Llama 3.2 1B/3B: llama3 scaling and tied embeddings
    "llama3-tied": ("LlamaConfig", dict(max_position_embeddings=512, rope_theta=500000.0, tie_word_embeddings=True,
                                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0,
                                                          original_max_position_embeddings=ORIGINAL))),
    "llama-linear": ("LlamaConfig", dict(max_position_embeddings=256,
                                         rope_scaling=dict(rope_type="linear", factor=4.0))),
    # DeepSeek-style YaRN knobs (mscale / mscale_all_dim, beta_fast) on a Llama
    "llama-yarn": ("LlamaConfig", dict(max_position_embeddings=256, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL, mscale=1.0, mscale_all_dim=0.5,
        beta_fast=16.0))),
    "qwen2": ("Qwen2Config", dict(max_position_embeddings=256, rope_theta=1e6)),
    # Qwen2.5 0.5B: tied, YaRN the way Qwen's docs add it (type + factor + original)
    "qwen2-yarn-tied": ("Qwen2Config", dict(max_position_embeddings=256, tie_word_embeddings=True, rope_scaling=dict(
        type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL))),
    "qwen3-yarn": ("Qwen3Config", dict(head_dim=16, max_position_embeddings=256, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=ORIGINAL))),
    "mistral-no-window": ("MistralConfig", dict(max_position_embeddings=256, sliding_window=None)),
}
SCALED = [name for name, (_, kw) in FAMILIES.items() if kw.get("rope_scaling")]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _hf_model(name: str):
    cls, kw = FAMILIES[name]
    config = getattr(transformers, cls)(**SHAPE, **kw)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():   # HF zero-inits biases: random ones, or a missing bias would go unseen
        for key, p in hf.named_parameters():
            if key.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, HF model, its save_pretrained directory, ours loaded from it)."""
    hf = _hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return request.param, hf, directory, Transformer.from_pretrained(directory)


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_logits_match_hf(family):
    name, hf, _, ours = family
    cfg = ours.config
    assert cfg.tie_weight == bool(hf.config.tie_word_embeddings)
    assert cfg.qkv_bias == name.startswith("qwen2") and cfg.use_qk_norm == name.startswith("qwen3")
    ids = _ids(200, batch=2)   # past ORIGINAL: the scaled part of every table is exercised
    with torch.no_grad():
        ref = hf(ids).logits
        assert _rel_err(ours(ids), ref) < 1e-4
        if name in SCALED:   # the scaling matters: plain RoPE over the same weights is far off
            plain = rope_tables(cfg.rope_dim, cfg.max_len, cfg.rope_theta)
            ours.rope_cos, ours.rope_sin = plain
            try:
                assert _rel_err(ours(ids), ref) > 1e-2
            finally:
                ours._build_rope()


def test_engine_greedy_matches_hf_generate(family):
    """Paged KV + prefix cache + chunked prefill + fused q/k/v(+bias) == HF generate, past ORIGINAL."""
    _, hf, directory, _ = family
    assert_engine_matches_hf_generate(hf, directory, VOCAB, prefix_len=130, max_tokens=12, num_pages=160,
                                      max_num_batched_tokens=48)


def test_export_round_trips_to_identical_logits(family, tmp_path):
    name, hf, directory, ours = family
    out = export_hf(directory, tmp_path / "hf")
    data = json.loads((out / "config.json").read_text())
    assert data["architectures"] == [type(hf).__name__.replace("Mistral", "Llama")]
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    again = Transformer.from_pretrained(out)
    assert again.config == ours.config
    ids = _ids(200, batch=2, seed=3)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
        assert torch.equal(again(ids), ours(ids))


def _native(**kw) -> Transformer:
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, dim_ffn=96,
                max_len=256, init_std=0.3, tie_weight=False)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**base, **kw})).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("kw,arch", [
    (dict(qkv_bias=True), "Qwen2ForCausalLM"),
    (dict(qkv_bias=True, rope_type="yarn", rope_factor=4.0, rope_original_max_len=ORIGINAL, rope_beta_fast=8.0),
     "Qwen2ForCausalLM"),
    (dict(rope_type="llama3", rope_factor=8.0, rope_original_max_len=ORIGINAL, tie_weight=True), "LlamaForCausalLM"),
    (dict(rope_type="linear", rope_factor=2.0, use_qk_norm=True), "Qwen3ForCausalLM"),
])
def test_astrai_model_exports_to_stock_class(tmp_path, kw, arch):
    ours = _native(**kw)
    ours.save_pretrained(tmp_path / "ours")
    out = export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = _ids(180, batch=2, seed=4)
    with torch.no_grad():
        assert _rel_err(ours(ids), hf(ids).logits) < 1e-4


def test_qkv_bias_fuses_with_the_weights():
    model = _native(qkv_bias=True)
    ids = _ids(23, batch=2)
    with torch.no_grad():
        before = model(ids)
        fuse_projections(model)
        attn = model.layers[0].self_attn
        assert attn.qkv_bias.shape == (attn.qkv_weight.shape[0],)
        assert attn.k_proj.bias.data_ptr() == attn.qkv_bias.data_ptr() + attn.q_proj.bias.numel() * 4  # views
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
        attn.v_proj.bias.add_(1.0)           # an update of a view reaches the fused matmul
        assert not torch.allclose(model(ids), before)


def _llama(**kw) -> dict:
    data = dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    data.update(kw)
    return data


@pytest.mark.parametrize("data,field", [
    (_llama(rope_scaling=dict(rope_type="dynamic", factor=2.0)), "rope_type='dynamic'"),
    (_llama(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)), "longrope"),
    (_llama(rope_scaling=dict(rope_type="yarn", factor=2.0, mrope_section=[2, 2])), "mrope_section"),
    (_llama(rope_scaling=dict(rope_type="llama3", factor=8.0)), "low_freq_factor"),
    (_llama(rope_parameters=dict(full_attention=dict(rope_type="default"))), "rope_parameters"),
    (_llama(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (_llama(mlp_bias=True), "mlp_bias=True"),
    (_llama(attention_bias=True), "attention_bias=True"),
    (_llama(hidden_act="gelu"), "hidden_act='gelu'"),
    (_llama(attention_dropout=0.1), "attention_dropout=0.1"),
    (_llama(quantization_config=dict(quant_method="awq")), "quantization_config"),
    (_llama(model_type="qwen3", attention_bias=True), "attention_bias=True"),
    (_llama(model_type="qwen2", use_sliding_window=True, sliding_window=64), "use_sliding_window=True"),
    (_llama(model_type="qwen2", layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (_llama(model_type="mistral", sliding_window=4096), "sliding_window=4096"),
    (_llama(model_type="mistral"), "sliding_window=4096"),   # transformers' default when the key is absent
    (_llama(model_type="qwen2_moe"), "model_type 'qwen2_moe'"),   # MoE families: tests/test_model_moe.py
    (_llama(model_type="deepseek_v3"), "model_type 'deepseek_v3'"),
    (_llama(hidden_size=None), "hidden_size"),
])
def test_unsupported_options_are_refused_by_name(data, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        config_from_hf(data)


def test_defaults_follow_transformers_classes():
    # Keys a config.json may omit mean what the transformers class defaults mean.
    assert config_from_hf(_llama(model_type="qwen3", head_dim=None)).head_dim == 16
    qwen3 = {k: v for k, v in _llama(model_type="qwen3").items() if k != "num_key_value_heads"}
    with pytest.raises(ConfigError, match="n_kv_heads"):    # Qwen3Config's default is 32 kv heads
        config_from_hf(qwen3)
    assert config_from_hf(_llama(model_type="mistral", sliding_window=None)).max_len == 256
    # plain RoPE reads only rope_theta (in transformers too): extras there change nothing
    assert config_from_hf(_llama(rope_parameters=dict(rope_type="default", rope_theta=5e5, factor=1.0))).rope_theta == 5e5
    yarn = config_from_hf(_llama(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64)))
    assert yarn.max_len == 256 and yarn.rope_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)


@pytest.mark.parametrize("kw,field", [
    (dict(rope_factor=2.0), "rope_factor"),                       # no effect with rope_type default
    (dict(rope_type="dynamic", rope_factor=2.0), "rope_type"),
    (dict(rope_type="linear", rope_beta_fast=8.0), "rope_beta_fast"),
    (dict(rope_type="llama3", rope_low_freq_factor=4.0), "rope_high_freq_factor"),
    (dict(qkv_bias=True, attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
     "qkv_bias"),
])
def test_model_config_validates_rope_and_bias(kw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**kw)


def test_qkv_bias_with_qk_norm_is_not_exported(tmp_path):
    _native(qkv_bias=True, use_qk_norm=True).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="qkv_bias"):
        export_hf(tmp_path / "m", tmp_path / "hf")


def test_docs_table_lists_what_the_importer_accepts():
    text = (ROOT / "docs" / "models.md").read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    col = header.index("model_type")
    listed = {cell.strip().strip("`") for row in rows[1:] for cell in [row[col]] if not set(cell.strip()) <= {"-"}}
    assert listed == set(SUPPORTED_MODEL_TYPES)
    refused = re.search(r"^Refused model types: (.*)$", text, re.M)
    assert refused, "docs/models.md should name the refused model types on a 'Refused model types:' line"
    for model_type in re.findall(r"`([a-z0-9_]+)`", refused.group(1)):
        with pytest.raises(ConfigError, match="model_type"):
            config_from_hf(_llama(model_type=model_type))
