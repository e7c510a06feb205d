"""The compiled forward (compile_decode) on the CPU: attention as one custom op (engine/attend_op.py).

compile_decode runs only with CUDA graphs, but the op and the compiler are the same on a CPU with
the torch kernel: the whole forward must trace as ONE graph (fullgraph=True fails on any break),
write the same keys and values and give the same hidden states as the eager forward, and the
generated code must write the caches in place (a functional copy of a multi-GB cache per layer
would be correct and ruinous).
"""
from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from astrai_serve.engine.attend_op import CompiledAttention
from astrai_serve.engine.paged_attention import PagedAttention, PagedKVCache, StepMetadata
from astrai_serve.kernels import get_attention_impl
from astrai_train.model import ModelConfig, Transformer, fuse_projections, kv_layout

MLA = dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def step(config: ModelConfig, attention: type, forward) -> tuple[torch.Tensor, PagedKVCache, list[str]]:
    """A prefill of 3 tokens beside a 2-token chunk of a second sequence, into fresh caches."""
    cache = PagedKVCache(kv_layout(config), config.n_layers, 8, 4, torch.float32, torch.device("cpu"))
    meta = StepMetadata(slot_mapping=torch.tensor([0, 1, 2, 4, 5]),
                        page_table=torch.tensor([[0], [1]], dtype=torch.int32),
                        cu_seqlens_q=torch.tensor([0, 3, 5], dtype=torch.int32),
                        context_lens=torch.tensor([3, 2], dtype=torch.int32))
    ids, positions = torch.tensor([3, 4, 5, 6, 7]), torch.tensor([0, 1, 2, 0, 1])
    with torch.inference_mode():
        out, code = run_and_get_code(forward, ids, positions, attention(cache, meta, get_attention_impl("torch")))
    return out, cache, code


def top_level_args(text: str) -> list[str]:
    """The comma-separated arguments of a call whose text starts after its '('."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            if depth == 0:
                return args + [text[start:i].strip()]
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    raise ValueError(f"unbalanced call: {text}")


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_compiled_forward_is_one_graph_writing_the_cache_in_place(arch):
    config = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=64, max_len=64,
                         use_qk_norm=arch == "gqa", **(MLA if arch == "mla" else {}))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    fuse_projections(model)
    want, want_cache, _ = step(config, PagedAttention, model.forward_flat)
    compiled = torch.compile(model.forward_flat, dynamic=True, fullgraph=True)
    got, got_cache, code = step(config, CompiledAttention, compiled)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert int((got_cache.k != 0).sum()) == 5 * int((want_cache.k[0, 0, 0] != 0).numel()) * config.n_layers
    torch.testing.assert_close(got_cache.k, want_cache.k, atol=1e-5, rtol=1e-5)
    if arch == "gqa":
        torch.testing.assert_close(got_cache.v, want_cache.v, atol=1e-5, rtol=1e-5)
    calls = [top_level_args(line.split("paged_attend.default(", 1)[1])
             for line in "\n".join(code).splitlines() if "torch.ops.astrai.paged_attend.default(" in line]
    assert len(calls) == config.n_layers                  # one graph: every layer's call in it
    caches = {tuple(args[3:5]) for args in calls}
    # every layer gets the compiled function's own inputs (argN_1), never a buffer made from them
    assert len(caches) == 1 and all(re.fullmatch(r"arg\d+_1|None", a) for a in caches.pop()), calls
