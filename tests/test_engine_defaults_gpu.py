"""The engine's defaults on a GPU: what `LLM(model_dir)` and `astrai serve --model DIR` run with no flags.

- No engine arguments give the fast path: CUDA graphs, the compiled decode, the fused kernels,
  batch limits sized from the GPU's memory.
- Its greedy tokens equal `enforce_eager=True`'s (no graphs, no compile) on a set of prompts,
  except where the two bf16 paths pick different tokens at a measured near tie: there, an fp32
  recompute of the shared prefix must score the two tokens within NEAR_TIE of each other. The
  gaps found are printed (`pytest -s`), which is where docs/benchmarks.md's figures come from.
Run with `pytest -m gpu`.
"""
from __future__ import annotations

import copy

import pytest
import torch

from astrai_serve.engine import LLMEngine, SamplingParams
from astrai_train.model import ModelConfig, Transformer

pytestmark = pytest.mark.gpu

# A Qwen3-like body (QK-norm, GQA 8/4, tied embeddings), small enough to compile in seconds.
QWEN3_LIKE = ModelConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, dim_ffn=768, max_len=1024,
                         use_qk_norm=True, init_std=0.1)
# Two bf16 paths differ by rounding (~2^-8 of a value); a tie closer than this share of the
# top logit's size is one either may break.
NEAR_TIE = 0.02
MAX_TOKENS = 48


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(QWEN3_LIKE).to("cuda", torch.bfloat16).eval()


def _greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [list(done[f"r{i}"]) for i in range(len(prompts))]


def test_defaults_take_the_fast_path_and_size_from_the_gpu():
    engine = LLMEngine.from_model(_model(), None)
    c = engine.config
    assert c.resolved_cuda_graphs() and c.resolved_compile_decode() and c.resolved_fused_kernels()
    assert engine.runner.graphs is not None and engine.runner.graphs.compiled
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    headroom = torch.cuda.get_device_properties(0).total_memory - weights
    assert (c.max_num_seqs, c.max_num_batched_tokens) == c.batch_limits(headroom)
    if headroom >= 40 << 30:
        assert (c.max_num_seqs, c.max_num_batched_tokens) == (256, 16384)
    assert engine.runner.graphs.sizes[-1] == c.max_num_seqs
    assert engine.startup.graphs_s > 0 and engine.startup.cache is not None
    eager = LLMEngine.from_model(_model(), None, enforce_eager=True, num_pages=64)
    assert eager.runner.graphs is None and not eager.config.resolved_decode_gemv()


@torch.no_grad()
def _fp32_gap(model32: Transformer, prefix: list[int], a: int, b: int) -> tuple[float, float]:
    """(|logit a - logit b|, |top logit|) of an fp32 forward over `prefix`, at its last position."""
    logits = model32(torch.tensor([prefix], device="cuda"))[0, -1].float()
    return abs(float(logits[a] - logits[b])), float(logits.abs().max())


def test_default_greedy_equals_eager_except_at_measured_near_ties():
    model = _model()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, QWEN3_LIKE.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 300, (24,), generator=g)]
    fast = _greedy(LLMEngine.from_model(model, None, max_num_seqs=32, num_pages=2048), prompts)
    eager = _greedy(LLMEngine.from_model(model, None, enforce_eager=True, max_num_seqs=32, num_pages=2048), prompts)
    model32 = copy.deepcopy(model).float()
    same, ties = 0, []
    for p, x, y in zip(prompts, fast, eager):
        if x == y:
            same += 1
            continue
        t = next(i for i, (u, v) in enumerate(zip(x, y)) if u != v)
        gap, top = _fp32_gap(model32, p + x[:t], x[t], y[t])
        ties.append((len(p), t, gap, gap / max(top, 1.0)))
    print(f"\ndefault vs enforce_eager, bf16, {len(prompts)} prompts x {MAX_TOKENS} greedy tokens: {same} identical; "
          f"divergences (prompt len, first differing token, fp32 gap, gap / |top logit|): {ties}")
    assert all(rel <= NEAR_TIE for *_, rel in ties), f"a divergence that is not a near tie: {ties}"
    assert same >= len(prompts) * 3 // 4, f"only {same}/{len(prompts)} identical: {ties}"
