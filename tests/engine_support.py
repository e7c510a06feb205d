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


CONFIGS = {"gqa": GQA, "mla": MLA}


def prompts_of(lengths, seed=1):
    """Random token-id prompts of the given lengths (ids below the models' vocab of 300)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]


def model_of(arch: str):
    """The seeded test model of `arch` ("gqa" or "mla") on the CPU, float32, in eval mode."""
    import torch

    from astrai_train.model import Transformer

    torch.manual_seed(0)
    return Transformer(CONFIGS[arch]).eval()


def gpu_model_of(arch: str, dtype=None):
    """The seeded test model of `arch` on the GPU, in eval mode (float32 unless dtype is given)."""
    import torch

    return model_of(arch).to("cuda", dtype or torch.float32)
