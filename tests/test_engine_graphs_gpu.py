"""CUDA graphs for decode and the no-host-sync rule, on a real GPU. Run with `pytest -m gpu`.

- greedy outputs with graphs (padded batches, eager fallback above the largest graph, overlapped
  steps) equal those without graphs and a full recomputation;
- every step path (graph decode, eager decode, chunked prefill mixed with decodes, the sampler
  with penalties / top-k / top-p / min-p / seeds / log-probs, n > 1, prefix-cache hits) runs
  under `torch.cuda.set_sync_debug_mode("error")`: the only wait allowed is the event on the
  sampled ids' copy, which that mode does not count, so any other host sync fails the test;
- capture honours its time budget (the largest graph always, smaller batches pad up to it);
- with compile_decode the compiled, captured forward gives the same greedy tokens.
"""
from __future__ import annotations

import pytest
import torch

from astrai_serve.engine import LLMEngine, SamplingParams
from astrai_serve.engine.cuda_graphs import graph_batch_sizes

from engine_support import gpu_model_of, prompts_of  # noqa: E402

pytestmark = pytest.mark.gpu

model_of = gpu_model_of  # the CPU engine tests' models (engine_support.py), on the GPU


PROMPTS = prompts_of((3, 17, 40, 9, 33, 21, 5, 12, 26, 8, 15))
# The first admitted runs longest, so padded batches (and their writes) happen while it still runs.
LENGTHS = [24 - 2 * i for i in range(len(PROMPTS))]


@torch.no_grad()
def recompute_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids], device="cuda"))[0, -1].argmax()))
    return ids[len(prompt):]


def count_graph_steps(engine) -> list[bool]:
    seen: list[bool] = []
    uses = engine.runner.uses_graph
    engine.runner.uses_graph = lambda plan: seen.append(uses(plan)) or seen[-1]
    return seen


def run_all(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            done.setdefault(o.request_id, {})[o.index] = o
        steps += 1
    return [[done[f"r{i}"][k] for k in sorted(done[f"r{i}"])] for i in range(len(prompts))], steps


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_graph_decode_equals_eager_and_recompute(arch):
    model = model_of(arch)
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in LENGTHS]
    expected = [recompute_greedy(model, p, n) for p, n in zip(PROMPTS, LENGTHS)]
    common = dict(num_pages=96, page_size=4, max_num_seqs=10)
    eager = LLMEngine.from_model(model, None, enable_cuda_graphs=False, overlap_steps=False, **common)
    assert eager.runner.graphs is None
    eager_outs, _ = run_all(eager, PROMPTS, params)
    for overlap in (False, True):
        engine = LLMEngine.from_model(model, None, compile_decode=False, cuda_graph_max_batch=6, overlap_steps=overlap, **common)
        graphs = engine.runner.graphs
        assert graphs.sizes == [1, 2, 4, 6] and graphs.capture_seconds > 0
        assert engine.kv.num_pages == engine.runner.cache.num_pages - 1 == graphs.pad_page
        used = count_graph_steps(engine)
        outs, _ = run_all(engine, PROMPTS, params)
        assert [o[0].token_ids for o in outs] == [o[0].token_ids for o in eager_outs] == expected
        assert sum(used) >= 10 and not all(used)          # graph steps, and eager ones (prefill, > 6)
        assert engine.stats().pages_in_use == 0


@pytest.mark.parametrize("graphs, overlap", [(True, True), (True, False), (False, False)])
def test_no_host_sync_in_any_step(graphs, overlap):
    model = model_of("gqa", torch.bfloat16)
    shared = PROMPTS[2][:32]
    prompts = PROMPTS[:6] + [shared + [7, 8, 9], shared + [1, 2]]        # a prefix-cache hit
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=40, min_p=0.05),
              SamplingParams(max_tokens=9, temperature=1.0, seed=7),
              SamplingParams(max_tokens=11, temperature=0.0, repetition_penalty=1.2, presence_penalty=0.5,
                             frequency_penalty=0.3),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=3),
              SamplingParams(max_tokens=7, temperature=0.9, n=2, seed=3),
              SamplingParams(max_tokens=10, temperature=0.0),
              SamplingParams(max_tokens=6, temperature=0.5, logprobs=True)]
    engine = LLMEngine.from_model(model, None, compile_decode=False, num_pages=128, page_size=8, max_num_seqs=16,
                                  max_num_batched_tokens=24, enable_cuda_graphs=graphs, cuda_graph_max_batch=8,
                                  overlap_steps=overlap)
    first, _ = run_all(engine, prompts, params)           # warm-up: kernels compile, pools grow
    torch.cuda.synchronize()
    engine.reset_prefix_cache()
    used = count_graph_steps(engine)
    for i, p in enumerate(prompts):
        engine.add_request(f"s{i}", p, params[i])          # seeded generators are made here, outside
    torch.cuda.set_sync_debug_mode("error")
    try:
        steps, outs = 0, {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs[(o.request_id, o.index)] = o
            steps += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert steps > 10 and len(outs) == 9 and all(o.finished for o in outs.values())
    assert outs[("s4", 0)].logprobs is not None
    assert any(used) == graphs and not all(used)           # graph decodes and eager (mixed) steps
    # Same greedy tokens as the warm-up round for the greedy requests (0, 3, 4, 6).
    for i in (0, 3, 4, 6):
        assert outs[(f"s{i}", 0)].token_ids == first[i][0].token_ids


@pytest.mark.parametrize("graphs", [True, False])
def test_async_steps_have_no_host_sync_and_keep_the_tokens(graphs):
    """Decode steps launched on the previous step's ids still on the device (async scheduling,
    on by default with CUDA): no host sync in them, seeded and greedy tokens as without."""
    model = model_of("gqa", torch.bfloat16)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in LENGTHS[:6]] + [
        SamplingParams(max_tokens=14, temperature=0.9, top_k=50, seed=5, n=2)]
    prompts = PROMPTS[:7]
    outs = {}
    for flag in (False, True):
        engine = LLMEngine.from_model(model, None, compile_decode=False, num_pages=128, page_size=8, max_num_seqs=16,
                                      enable_cuda_graphs=graphs, cuda_graph_max_batch=8, async_scheduling=flag)
        run_all(engine, prompts, params)                  # warm-up: kernels compile, pools grow
        torch.cuda.synchronize()
        for i, p in enumerate(prompts):
            engine.add_request(f"s{i}", p, params[i])
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = {}
            while engine.has_unfinished_requests():
                got.update({(o.request_id, o.index): o.token_ids for o in engine.step() if o.finished})
        finally:
            torch.cuda.set_sync_debug_mode(0)
        outs[flag] = got
        assert (engine.num_async_steps > 10) == flag and engine.stats().pages_in_use == 0
    assert outs[True] == outs[False] and len(outs[True]) == 8


def test_capture_budget_keeps_the_largest_graph():
    model = model_of("gqa")
    full = LLMEngine.from_model(model, None, compile_decode=False, num_pages=64, page_size=16, max_num_seqs=20)
    assert full.runner.graphs.sizes == graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    short = LLMEngine.from_model(model, None, compile_decode=False, num_pages=64, page_size=16, max_num_seqs=8,
                                 cuda_graph_capture_budget_s=1e-9)
    assert short.runner.graphs.sizes == [8]                # one batch of 1 pads up to 8 rows
    used = count_graph_steps(short)
    outs, _ = run_all(short, PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0.0))
    assert outs[0][0].token_ids == recompute_greedy(model, PROMPTS[0], 10) and sum(used) == 9


def test_compiled_decode_graphs_equal_eager():
    model = model_of("gqa")
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in LENGTHS[:6]]
    common = dict(num_pages=96, page_size=4, max_num_seqs=8)
    eager, _ = run_all(LLMEngine.from_model(model, None, enable_cuda_graphs=False, **common), PROMPTS[:6], params)
    engine = LLMEngine.from_model(model, None, cuda_graph_max_batch=4, compile_decode=True, **common)
    used = count_graph_steps(engine)
    outs, _ = run_all(engine, PROMPTS[:6], params)
    # Batches of <= 4 once two of the six requests ended: 8 decode steps (24 - 16 tokens) in graphs.
    assert [o[0].token_ids for o in outs] == [o[0].token_ids for o in eager] and sum(used) >= 8


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_cascade_graph_decode_equals_recompute(arch, monkeypatch):
    """Requests behind one system prompt: the captured cascade graphs (shared pages attended once
    per chunk, padded rows included) give the tokens of a full recomputation."""
    from astrai_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", 1)
    model = model_of(arch)
    engine = LLMEngine.from_model(model, None, compile_decode=False, num_pages=160, page_size=4, max_num_seqs=10,
                                  cuda_graph_max_batch=8)
    assert engine.runner.graphs.takes_cascade(8) and (8, True) in engine.runner.graphs.graphs
    shared = []
    indices = engine.runner._indices
    engine.runner._indices = lambda plan, *a: (lambda idx: shared.append(
        None if idx["cascade"] is None else int(idx["cascade"][0])) or idx)(indices(plan, *a))
    system = prompts_of((30,), seed=7)[0]
    prompts = [system + q for q in prompts_of((3, 9, 1, 6, 12, 4, 7), seed=8)]
    run_all(engine, prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))   # caches the system prompt
    lengths = [12, 9, 12, 6, 10, 12, 8]
    outs, _ = run_all(engine, prompts, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o[0].token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    assert 28 in shared                     # 7 whole pages of the 30-token system prompt


@pytest.mark.parametrize("compile_decode", [False, True])
def test_decode_gemv_graphs_equal_recompute(compile_decode):
    """decode_gemv: graphs of 1-4 sequences run their matmuls through the Triton GEMV (a custom op,
    kept whole by torch.compile); float32, so the greedy tokens must equal a recompute."""
    model = model_of("gqa")
    prompts = PROMPTS[:3]
    lengths = LENGTHS[:3]
    engine = LLMEngine.from_model(model, None, num_pages=96, page_size=4, max_num_seqs=4, cuda_graph_max_batch=4,
                                  decode_gemv=True, compile_decode=compile_decode)
    used = count_graph_steps(engine)
    outs, _ = run_all(engine, prompts, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o[0].token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    assert any(used)


def test_no_jit_compile_after_startup(monkeypatch):
    """Every Triton kernel a step needs is compiled while the engine starts. A cold server once
    compiled prefill-attention variants mid-serving (1-2 s each on an H200: W4's TTFT of
    seconds): one per alignment of the per-step metadata views and per batch-size class."""
    import random

    from triton import knobs

    from astrai_serve.kernels import triton_attention, triton_gemv, triton_kv_store, triton_sampling

    for fn in (triton_attention._paged_attn_kernel, triton_attention._shared_prefix_kernel,
               triton_attention._merge_splits_kernel, triton_kv_store._store_kv_kernel,
               triton_sampling._gumbel_split_kernel, triton_sampling._pick_split_kernel, triton_gemv._gemv_kernel):
        fn.device_caches.clear()                          # forget what earlier tests compiled
    model = model_of("gqa", torch.bfloat16)
    engine = LLMEngine.from_model(model, None, compile_decode=False, num_pages=256, page_size=8, max_num_seqs=16,
                                  max_num_batched_tokens=40, cuda_graph_max_batch=16)
    compiled: list[str] = []
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["repr"]))
    # Requests of assorted lengths join while others decode: chunked prefills of many sizes
    # beside 1..16 decodes, greedy and sampled rows, so the metadata views land at every offset.
    rng = random.Random(0)
    steps = 0
    for i in range(30):
        prompt = [rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 70))]
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 14), ignore_eos=True,
                                                           temperature=rng.choice([0.0, 1.0])))
        for _ in range(rng.randint(0, 3)):
            engine.step()
            steps += 1
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps > 40 and engine.stats().pages_in_use == 0
    assert compiled == [], f"{len(compiled)} JIT compiles after startup, the first: {compiled[0][:300]}"


@pytest.mark.parametrize("arch", ["gqa", "mla"])
def test_fp8_cache_graphs_equal_eager(arch):
    """kv_cache_dtype="fp8" through the Triton store and attention, in graphs and eagerly: the
    same greedy tokens (both read the same rounded pages)."""
    model = model_of(arch, torch.bfloat16)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in LENGTHS]
    outs = []
    for graphs in (True, False):
        engine = LLMEngine.from_model(model, None, compile_decode=False, num_pages=128, page_size=8, max_num_seqs=16,
                                      enable_cuda_graphs=graphs, cuda_graph_max_batch=8, kv_cache_dtype="fp8")
        assert engine.runner.cache.k.dtype == torch.float8_e4m3fn
        got, _ = run_all(engine, PROMPTS, params)
        outs.append([o[0].token_ids for o in got])
        assert engine.stats().pages_in_use == 0
    assert outs[0] == outs[1]
