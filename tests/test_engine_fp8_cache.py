"""An fp8 KV cache (EngineConfig.kv_cache_dtype="fp8") on the CPU: the pages hold float8 e4m3,
the store rounds into them and attention widens them back, so a budget holds more tokens and the
model sees exactly the rounded keys and values. The kernels with an fp8 cache are checked against
the reference in test_kernels_triton_cpu.py (interpreter) and test_kernels_gpu.py."""
from __future__ import annotations

import pytest
import torch

from astrai_serve.engine import EngineConfig, LLMEngine, SamplingParams
from astrai_serve.engine.paged_attention import PagedAttention
from astrai_train.model import Transformer

from engine_support import CONFIGS, prompts_of

pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread

PROMPTS = prompts_of((3, 17, 40, 9, 21))
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 9, 14, 6, 10)]


def generate(engine):
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, PARAMS[i])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_cache_gives_the_tokens_of_keys_and_values_rounded_to_fp8(arch, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(CONFIGS[arch]).eval()
    fp8 = LLMEngine.from_model(model, None, num_pages=64, page_size=4, max_num_seqs=4, kv_cache_dtype="fp8")
    assert fp8.runner.cache.k.dtype == torch.float8_e4m3fn
    got = generate(fp8)
    assert fp8.stats().pages_in_use == 0

    # The same engine with a float32 cache whose writes are rounded through fp8 on the way in:
    # attention then reads the very values the fp8 pages hold, so greedy tokens must agree.
    store = PagedAttention.attend

    def rounded(self, layer, q, k, v, scale):
        k = k.to(torch.float8_e4m3fn).to(k.dtype)
        v = None if v is None else v.to(torch.float8_e4m3fn).to(v.dtype)
        return store(self, layer, q, k, v, scale)

    monkeypatch.setattr(PagedAttention, "attend", rounded)
    emulated = LLMEngine.from_model(model, None, num_pages=64, page_size=4, max_num_seqs=4)
    assert emulated.runner.cache.k.dtype == torch.float32
    assert got == generate(emulated)
    monkeypatch.setattr(PagedAttention, "attend", store)

    exact_tokens = generate(LLMEngine.from_model(model, None, num_pages=64, page_size=4, max_num_seqs=4))
    assert exact_tokens != got          # (4 of 5 requests differ for gqa, 3 for mla)

    # Rounding is not nothing: one prompt's cached first-layer keys (MLA: latents) differ from
    # the exact ones by what e4m3 rounding costs (<= 2^-4 of each value; later layers also
    # carry the rounding of the layers before them).
    caches = []
    for dtype in ("auto", "fp8"):
        engine = LLMEngine.from_model(model, None, num_pages=64, page_size=4, max_num_seqs=4, kv_cache_dtype=dtype)
        engine.add_request("x", PROMPTS[2], SamplingParams(max_tokens=1, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()
        caches.append(engine.runner.cache.k[0].float())
    exact, rounded_keys = caches
    assert not torch.equal(exact, rounded_keys)
    assert float((exact - rounded_keys).norm() / exact.norm()) < 2 ** -4


def test_fp8_cache_holds_four_times_the_float32_tokens_of_a_budget():
    torch.manual_seed(0)
    model = Transformer(CONFIGS["gqa"]).eval()
    budget = 1 << 20
    full = LLMEngine.from_model(model, None, kv_cache_memory_bytes=budget, page_size=4)
    small = LLMEngine.from_model(model, None, kv_cache_memory_bytes=budget, page_size=4, kv_cache_dtype="fp8")
    assert small.kv.num_pages == 4 * full.kv.num_pages
    assert small.runner.cache.nbytes <= budget


def test_unknown_kv_cache_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int4'.*auto, fp8"):
        EngineConfig(kv_cache_dtype="int4")
