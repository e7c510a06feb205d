"""Tiny random models shared by the engine tests."""
from __future__ import annotations

from astrai_serve.engine import SamplingParams
from astrai_train.model import ModelConfig

# init_std 0.5: a random model whose greedy outputs vary (0.1 repeats one token) with clear argmax margins.
GQA = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=256,
                  init_std=0.5)
MLA = ModelConfig.from_preset("mla-tiny", vocab_size=300, dim=64, n_layers=2, dim_ffn=128, max_len=256,
                              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              init_std=0.5)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
