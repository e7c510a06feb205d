"""The decode fast path on the CPU: graph padding and static buffers (CUDA graphs emulated by eager
replays), host page tables kept between steps, overlapped steps, batched detokenization, and the
engine settings that turn these on. The real CUDA graphs are in test_engine_graphs_gpu.py."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from astrai_serve.engine import EngineConfig, LLMEngine, SamplingParams
from astrai_serve.engine.cuda_graphs import graph_batch_sizes
from astrai_serve.engine.model_runner import ModelRunner
from astrai_serve.engine.outputs import advance_text, check_stop, finish_reasons, new_state
from astrai_serve.engine.paged_attention import PagedKVCache
from astrai_serve.engine.sequence import Sequence
from astrai_serve.kernels import get_attention_impl
from astrai_train.model import fuse_projections, kv_layout
from astrai_train.tokenizer import IncrementalDetokenizer, Tokenizer
from astrai_train.tokenizer.detokenizer import push_many

from engine_support import GQA, GREEDY, model_of, prompts_of  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # toy matmuls: see conftest.one_thread


@pytest.fixture(scope="module")
def models():
    return {arch: model_of(arch) for arch in ("gqa", "mla")}


PROMPTS = prompts_of((3, 17, 40, 9, 33, 21, 5))


@torch.no_grad()
def recompute_greedy(model, prompt, n=10):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run_all(engine, prompts, params=GREEDY, abort_after=None):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params[i] if isinstance(params, list) else params)
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
        if steps == abort_after:
            engine.abort_request("r0")
    return [done.get(f"r{i}") for i in range(len(prompts))]


def with_emulated_graphs(engine, max_batch, decode_ops=None):
    """Swap in a runner with 'graphs' (eager replays on the CPU) and the padding page they need."""
    mc, kv = engine.model_config, engine.kv
    cache = PagedKVCache(kv_layout(mc), mc.n_layers, kv.num_pages + 1, kv.page_size, torch.float32,
                         torch.device("cpu"))
    engine.runner = ModelRunner(engine.runner.model, cache, get_attention_impl("torch"), torch.device("cpu"),
                                engine.config.max_num_seqs, mc.max_len, pad_page=kv.num_pages,
                                graph_max_batch=max_batch, decode_ops=decode_ops)
    used = []
    uses_graph = engine.runner.uses_graph
    engine.runner.uses_graph = lambda plan: used.append(len(plan.chunks)) or uses_graph(plan)
    return used


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("overlap", [False, True])
def test_padded_graph_decode_equals_recompute(models, arch, overlap):
    model = models[arch]
    engine = LLMEngine.from_model(model, None, num_pages=80, page_size=4, max_num_seqs=8, overlap_steps=overlap)
    used = with_emulated_graphs(engine, max_batch=6)
    assert engine.runner.graphs.sizes == [1, 2, 4, 6]
    # The batch shrinks as requests finish; the first admitted (holding page 0) runs longest.
    lengths = [16 - 2 * i for i in range(len(PROMPTS))]
    outs = run_all(engine, PROMPTS, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    graph_steps = [n for n in used if engine.runner.graphs.padded_size(n) is not None]
    assert {3, 5} & set(graph_steps) and any(n == 7 for n in used)   # padded batches and an eager one
    assert engine.stats().pages_in_use == 0
    pad = engine.runner.graphs.pad_page
    assert pad == engine.kv.num_pages == engine.runner.cache.num_pages - 1   # never handed out


@pytest.mark.parametrize("arch", ["gqa", "mla"])
@pytest.mark.parametrize("graphs", [False, True])
def test_cascade_decode_over_a_shared_prefix_equals_recompute(models, arch, graphs, monkeypatch):
    """Requests behind one system prompt decode with cascade attention (the shared pages attended
    once for the batch). The torch kernel checks each step's cascade plan against the page
    tables, so a wrong prefix length fails loudly, and the tokens must equal a recompute."""
    from astrai_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", 1)
    model = models[arch]
    engine = LLMEngine.from_model(model, None, num_pages=120, page_size=4, max_num_seqs=8)
    if graphs:
        with_emulated_graphs(engine, max_batch=6)
    system = prompts_of((26,), seed=7)[0]
    prompts = [system + q for q in prompts_of((3, 9, 1, 6, 12, 4), seed=8)]
    shared_steps = []
    indices = engine.runner._indices
    engine.runner._indices = lambda plan, *a: (lambda idx: shared_steps.append(first_shared(idx)) or idx)(indices(plan, *a))
    # One request first, so the rest find the system prompt in the prefix cache.
    first = run_all(engine, prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))
    lengths = [10, 8, 10, 6, 9, 10]              # the batch shrinks: padded graph rows join the cascade
    outs = run_all(engine, prompts, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert first[0].token_ids == outs[0].token_ids[:2]
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    assert 24 in shared_steps                   # the 6 whole pages of the system prompt
    assert engine.stats().pages_in_use == 0


def test_small_graphs_take_the_decode_ops_and_keep_the_tokens(models):
    """decode_gemv's plumbing: graphs of <= 4 sequences compute every projection and the LM head
    with the small-batch matmul, SwiGLU's down projection with its activation, and QK-norm +
    rotary in one op (on the CPU these ops are torch math); larger graphs and eager steps do
    not, and the tokens equal a recompute."""
    from astrai_serve.kernels.decode_matmul import DecodeOps

    model = copy.deepcopy(models["gqa"])
    fuse_projections(model)                 # as LLMEngine(model_dir) does: q/k/v and gate/up as one
    engine = LLMEngine.from_model(model, None, num_pages=80, page_size=4, max_num_seqs=8)
    rows, silu_rows, qk_rows = [], [], []

    class Recording(DecodeOps):
        def linear(self, x, w):
            rows.append((x.shape[0], tuple(w.shape)))
            return super().linear(x, w)

        def silu_mul_linear(self, gate_up, w):
            silu_rows.append((gate_up.shape[0], tuple(w.shape)))
            return super().silu_mul_linear(gate_up, w)

        def qk_norm_rope(self, q, k, q_norm, k_norm, cos, sin):
            qk_rows.append(q.shape[0])
            return super().qk_norm_rope(q, k, q_norm, k_norm, cos, sin)

    with_emulated_graphs(engine, max_batch=6, decode_ops=Recording())
    lengths = [16 - 2 * i for i in range(len(PROMPTS))]
    outs = run_all(engine, PROMPTS, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    mc = model.config
    assert rows and {n for n, _ in rows} <= {1, 2, 4}                 # captured sizes <= 4 only
    assert (mc.vocab_size, mc.dim) in {w for _, w in rows}            # the LM head
    # per layer: qkv, o and gate_up through linear; down_proj with its activation
    assert set(silu_rows) <= {(n, (mc.dim, mc.dim_ffn)) for n in (1, 2, 4)}
    graphs = len(silu_rows) // mc.n_layers
    assert graphs and len(rows) == graphs * (3 * mc.n_layers + 1) and len(qk_rows) == graphs * mc.n_layers


def first_shared(idx: dict) -> int | None:
    """The first sequence's shared tokens in a step's cascade plan (None: no cascade)."""
    return None if idx["cascade"] is None else int(idx["cascade"][0])


@pytest.mark.parametrize("graphs, min_shared", [(False, 1), (True, 1), (True, 13)])
def test_cascade_over_groups_of_samples_equals_recompute(models, graphs, min_shared, monkeypatch):
    """GRPO's shape: n samples behind each of several prompts share that prompt's pages. Each
    group becomes a cascade chunk of its own (the torch kernel checks the plan against the page
    tables), and the tokens equal a recompute. Prefixes shorter on average than
    CASCADE_MIN_SHARED_TOKENS (here 12 against 13) are read the plain way."""
    from astrai_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", min_shared)
    model = models["gqa"]
    engine = LLMEngine.from_model(model, None, num_pages=120, page_size=4, max_num_seqs=9)
    if graphs:
        with_emulated_graphs(engine, max_batch=9)
    plans = []
    indices = engine.runner._indices
    engine.runner._indices = lambda plan, *a: (lambda idx: plans.append(idx["cascade"]) or idx)(indices(plan, *a))
    prompts = prompts_of((13, 18, 9), seed=5)
    for i, p in enumerate(prompts):
        engine.add_request(f"g{i}", p, SamplingParams(max_tokens=8, temperature=0.0, n=3))
    samples = {}
    while engine.has_unfinished_requests():
        samples.update({(o.request_id, o.index): o.token_ids for o in engine.step() if o.finished})
    for i, p in enumerate(prompts):
        assert [samples[f"g{i}", k] for k in range(3)] == [recompute_greedy(model, p, 8)] * 3
    chunked = [p for p in plans if p is not None]
    if min_shared > 12:
        assert not chunked and len(plans) > 8, "a short shared prefix still ran cascade attention"
        return
    assert chunked, "no decode step ran with a cascade plan"
    s = 9
    c = (len(chunked[0]) - s) // 3
    assert sorted(chunked[0][s + c:s + 2 * c].tolist()) == [0] * (c - 3) + [3, 3, 3]   # a chunk per prompt
    assert chunked[0][:s].tolist() == [12] * 3 + [16] * 3 + [8] * 3          # its whole prompt pages
    assert engine.stats().pages_in_use == 0


def test_requests_behind_two_prompts_arriving_interleaved_form_one_chunk_each(models, monkeypatch):
    """Requests alternate between two system prompts (A, B, A, B, ...): the scheduler puts the
    decodes that start in the same page side by side, so cascade attention gets one chunk per
    prompt, and the tokens still equal a recompute."""
    from astrai_serve.engine import model_runner

    monkeypatch.setattr(model_runner, "CASCADE_MIN_SEQS", 2)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr(model_runner, "CASCADE_MIN_SHARED_TOKENS", 1)
    model = models["gqa"]
    engine = LLMEngine.from_model(model, None, num_pages=160, page_size=4, max_num_seqs=8)
    plans = []
    indices = engine.runner._indices
    engine.runner._indices = lambda plan, *a: (lambda idx: plans.append(idx["cascade"]) or idx)(indices(plan, *a))
    systems = prompts_of((20, 24), seed=11)
    run_all(engine, systems, SamplingParams(max_tokens=1, temperature=0.0))    # both prompts cached
    questions = prompts_of((3, 5, 2, 6, 4, 7), seed=12)
    prompts = [systems[i % 2] + q for i, q in enumerate(questions)]             # A, B, A, B, A, B
    plans.clear()
    outs = run_all(engine, prompts, SamplingParams(max_tokens=6, temperature=0.0))
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p, 6) for p in prompts]
    s = len(prompts)
    full = [p for p in plans if p is not None and len(p) > s]
    assert full, "no decode step of all six ran with a cascade plan"
    c = (len(full[0]) - s) // 3
    counts, shared = sorted(full[0][s + c:s + 2 * c].tolist()), sorted(full[0][s + 2 * c:].tolist())
    assert counts == [0] * (c - 2) + [3, 3] and shared == [0] * (c - 2) + [20, 24]   # one chunk per prompt


def test_host_page_tables_follow_sequences(models):
    """Rows patched incrementally must equal the sequences' tables through prefix-cache hits,
    page swaps at publish, n > 1 sharing, chunked prefill and preemption."""
    model = models["gqa"]
    checked = []
    for setup in (dict(num_pages=64, page_size=4), dict(num_pages=13, page_size=4),
                  dict(num_pages=40, page_size=4, max_num_batched_tokens=7),
                  dict(num_pages=64, page_size=4, enable_prefix_cache=False)):
        engine = LLMEngine.from_model(model, None, **setup)
        tables = engine.runner.tables
        rows_for = tables.rows_for

        def checking(chunks, rows_for=rows_for, tables=tables):
            rows = rows_for(chunks)
            for c, r in zip(chunks, rows):
                table = c.seq.page_table
                assert tables.array[r, :len(table)].tolist() == table
            assert len(set(rows)) == len(rows)
            checked.append(len(rows))
            return rows

        tables.rows_for = checking
        shared = prompts_of((20, 20, 30), seed=3)
        shared[1][:16] = shared[0][:16]                 # a prefix-cache hit, published concurrently
        run_all(engine, shared + PROMPTS[:4], SamplingParams(max_tokens=12, temperature=0.0, n=2))
        if setup["num_pages"] == 13:
            assert engine.stats().num_preemptions_total > 0
    assert sum(checked) > 100


def test_overlapped_steps_give_the_same_tokens(models):
    model = models["gqa"]
    params = [SamplingParams(max_tokens=9, temperature=0.0, logprobs=True, top_logprobs=2),
              SamplingParams(max_tokens=7, temperature=0.9, seed=5, top_p=0.8, repetition_penalty=1.3),
              SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[PROMPTS[0][0]]),
              SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=11, n=2)]
    got = {}
    for overlap in (False, True):
        engine = LLMEngine.from_model(model, None, num_pages=20, page_size=4, overlap_steps=overlap)
        for i, (p, sp) in enumerate(zip(PROMPTS, params)):
            engine.add_request(f"r{i}", p, sp)
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                outs.setdefault((o.request_id, o.index), []).append(o)
        got[overlap] = {k: ([t for o in v for t in o.new_token_ids], v[-1].finish_reason,
                            [lp for o in v for lp in (o.logprobs or [])]) for k, v in outs.items()}
        assert engine.stats().pages_in_use == 0 and engine._inflight is None
    assert got[True] == got[False] and len(got[True]) == 5


def test_abort_while_a_step_is_in_flight(models):
    model = models["gqa"]
    engine = LLMEngine.from_model(model, None, num_pages=64, page_size=4, overlap_steps=True)
    outs = run_all(engine, PROMPTS[:3], abort_after=2)
    assert outs[0] is None and [o.token_ids for o in outs[1:]] == [recompute_greedy(model, p) for p in PROMPTS[1:3]]
    assert engine.stats().pages_in_use == 0 and not engine.has_unfinished_requests()


def test_push_many_equals_push(tokenizer_dir):
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(0)
    # Random ids split multi-byte characters (the corpus has Chinese) and include special tokens.
    one = [IncrementalDetokenizer(tok, skip_special_tokens=i % 3 != 0) for i in range(24)]
    many = [IncrementalDetokenizer(tok, skip_special_tokens=i % 3 != 0) for i in range(24)]
    pieces = 0
    for _ in range(120):
        ids = [[rng.randrange(tok.vocab_size) for _ in range(rng.choice((1, 1, 1, 2)))] for _ in one]
        expected = [d.push(x) for d, x in zip(one, ids)]
        assert push_many(many, ids) == expected
        pieces += sum(map(bool, expected))
    assert [d.flush() for d in many] == [d.flush() for d in one] and pieces > 500


def test_batched_stop_checks_equal_the_per_sequence_ones(tokenizer_dir):
    """finish_reasons + advance_text (what the engine runs, split around the next launch) against
    check_stop on twin sequences: same reasons, same text, stop strings and ids included."""
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    rng = random.Random(1)
    words = ["the", "e ", "ing", "\n", "KING", "a"]
    twins = []
    for i in range(30):
        params = SamplingParams(max_tokens=rng.randint(3, 40), stop=rng.sample(words, rng.randint(0, 2)),
                                stop_token_ids=[rng.randrange(tok.vocab_size)] if i % 4 == 0 else [],
                                ignore_eos=i % 3 == 0, skip_special_tokens=i % 5 != 0)
        pair = [Sequence(i, f"r{i}", 0, [1, 2, 3], 3, params) for _ in range(2)]
        for seq in pair:
            seq.state = new_state(seq, tok, None)
        twins.append(pair)
    reasons_seen = set()
    while twins:
        for a, b in twins:
            token = rng.randrange(tok.vocab_size)
            a.token_ids.append(token)
            b.token_ids.append(token)
        expected = [check_stop(a, 64) for a, _ in twins]
        reasons, later = finish_reasons([b for _, b in twins], 64)
        advance_text([b for _, b in twins], reasons, later)
        assert reasons == expected
        assert [b.state.text for _, b in twins] == [a.state.text for a, _ in twins]
        reasons_seen.update(reasons)
        twins = [t for t, r in zip(twins, reasons) if r is None]
    assert reasons_seen == {None, "stop", "length"}


def test_graph_settings_are_validated():
    assert graph_batch_sizes(256)[-7:] == [64, 96, 128, 160, 192, 224, 256]
    assert graph_batch_sizes(10) == [1, 2, 4, 8, 10]
    cpu = EngineConfig(device="cpu")
    assert not cpu.resolved_cuda_graphs() and not cpu.resolved_overlap_steps()
    with pytest.raises(ValueError, match="enable_cuda_graphs=True: CUDA graphs need a CUDA device"):
        EngineConfig(device="cpu", enable_cuda_graphs=True).resolved_cuda_graphs()
    assert not cpu.resolved_decode_gemv()           # auto: only where graphs run
    with pytest.raises(ValueError, match="decode_gemv=True: the GEMV runs inside CUDA graphs"):
        EngineConfig(device="cpu", decode_gemv=True).resolved_decode_gemv()
    assert not cpu.resolved_decode_pdl() and not EngineConfig(device="cpu", decode_pdl=False).resolved_decode_pdl()
    with pytest.raises(ValueError, match=r"decode_pdl=True: it needs decode_gemv and a compiled Triton kernel "
                                         r"on a GPU of compute capability 9.0\+ \(device=cpu\)"):
        EngineConfig(device="cpu", decode_pdl=True).resolved_decode_pdl()
    for bad, message in ((dict(cuda_graph_max_batch=0), "cuda_graph_max_batch=0"),
                         (dict(cuda_graph_capture_budget_s=-1), "cuda_graph_capture_budget_s=-1"),
                         (dict(overlap_steps="yes"), "overlap_steps='yes'"),
                         (dict(enable_cuda_graphs=1), "enable_cuda_graphs=1"),
                         (dict(decode_gemv="on"), "decode_gemv='on'"),
                         (dict(decode_pdl="on"), "decode_pdl='on'"),
                         (dict(cascade_attention=None), "cascade_attention=None")):
        with pytest.raises(ValueError, match=message):
            EngineConfig(**bad)
    assert EngineConfig(max_num_seqs=32, cuda_graph_max_batch=100).resolved_graph_max_batch() == 32


def test_batch_limits_and_eager_defaults():
    """Unset batch limits are sized from the memory the weights leave; enforce_eager turns every
    graph-bound speed-up off and refuses a flag that asks for one."""
    gib = 1 << 30
    auto = EngineConfig()
    assert auto.batch_limits(None) == (64, 2048)              # a CPU
    assert auto.batch_limits(70 * gib) == (256, 16384)        # an H100 with a 0.6B model
    assert auto.batch_limits(20 * gib) == (128, 8192)         # 24 GiB with an 8B model in bf16
    assert auto.batch_limits(6 * gib) == (64, 4096)
    assert EngineConfig(max_num_seqs=12).batch_limits(70 * gib) == (12, 16384)   # a field set wins
    sized = auto.sized(70 * gib)
    assert (sized.max_num_seqs, sized.max_num_batched_tokens) == (256, 16384)
    with pytest.raises(RuntimeError, match="sized by the engine"):
        auto.resolved_graph_max_batch()
    cpu = EngineConfig(device="cpu")
    assert not cpu.resolved_compile_decode()
    with pytest.raises(ValueError, match="compile_decode=True: the compiled forward runs inside CUDA graphs"):
        EngineConfig(device="cpu", compile_decode=True).resolved_compile_decode()
    for flag in ("enable_cuda_graphs", "compile_decode", "decode_gemv", "decode_pdl"):
        with pytest.raises(ValueError, match=f"enforce_eager=True with {flag}=True"):
            EngineConfig(enforce_eager=True, **{flag: True})
    with pytest.raises(ValueError, match="enforce_eager=1"):
        EngineConfig(enforce_eager=1)
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        EngineConfig(max_num_seqs=0)


def test_engine_sizes_its_batch_limits_at_startup():
    engine = LLMEngine.from_model(model_of("gqa"), None, num_pages=32)
    assert (engine.config.max_num_seqs, engine.config.max_num_batched_tokens) == (64, 2048)
    assert engine.scheduler.max_num_seqs == 64 and engine.scheduler.max_num_batched_tokens == 2048


@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_kernels_plumbing_equals_recompute(qk_norm):
    """fused_kernels: every norm goes through add_rms_norm, SwiGLU's activation through silu_mul
    and (with QK-norm) the q/k norms and rotary through qk_norm_rope; on the CPU these custom
    ops run their torch formula, so the tokens must equal a recompute exactly (float32)."""
    from dataclasses import replace

    from astrai_serve.kernels.fused_ops import FusedOps
    from astrai_train.model import Transformer

    torch.manual_seed(0)
    model = Transformer(replace(GQA, use_qk_norm=qk_norm)).eval()
    fuse_projections(model)
    engine = LLMEngine.from_model(model, None, num_pages=80, page_size=4, max_num_seqs=8, fused_kernels=True)
    calls = {"norm": 0, "silu": 0, "qk": 0}

    class Counting(FusedOps):
        def add_rms_norm(self, x, residual, norm):
            calls["norm"] += 1
            return super().add_rms_norm(x, residual, norm)

        def silu_mul_linear(self, gate_up, w):
            calls["silu"] += 1
            return super().silu_mul_linear(gate_up, w)

        def qk_norm_rope(self, q, k, q_norm, k_norm, cos, sin):
            calls["qk"] += q_norm is not None
            return super().qk_norm_rope(q, k, q_norm, k_norm, cos, sin)

    assert isinstance(engine.runner.ops, FusedOps)
    engine.runner.ops = Counting()
    outs = run_all(engine, PROMPTS)
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p) for p in PROMPTS]
    layers = model.config.n_layers
    steps = calls["silu"] // layers
    assert steps > 0 and calls["norm"] == steps * (2 * layers + 1)
    assert calls["qk"] == (steps * layers if qk_norm else 0)
    assert not LLMEngine.from_model(model, None, num_pages=8).config.resolved_fused_kernels()   # CPU default: off


def test_compiled_graph_forward_with_fused_ops_equals_recompute(monkeypatch):
    """compile_decode's tracing on the CPU: DecodeGraphs compiles forward_flat with the fused
    ops (custom ops: one opaque node each, by their fake shape functions) and the attention
    behind a graph break. The backend is aot_eager (no C++ compiler needed), so what this
    checks is Dynamo's and AOTAutograd's view of the ops; the tokens must equal a recompute."""
    from dataclasses import replace

    from astrai_serve.kernels.fused_ops import FUSED_OPS
    from astrai_train.model import Transformer

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(replace(GQA, use_qk_norm=True)).eval()
    fuse_projections(model)
    engine = LLMEngine.from_model(model, None, num_pages=80, page_size=4, max_num_seqs=8, fused_kernels=True)
    mc, kv = engine.model_config, engine.kv
    cache = PagedKVCache(kv_layout(mc), mc.n_layers, kv.num_pages + 1, kv.page_size, torch.float32,
                         torch.device("cpu"))
    engine.runner = ModelRunner(model, cache, get_attention_impl("torch"), torch.device("cpu"), 8, mc.max_len,
                                pad_page=kv.num_pages, graph_max_batch=4, compile_graphs=True, ops=FUSED_OPS)
    assert engine.runner.graphs.compiled
    lengths = [12 - i for i in range(len(PROMPTS))]
    outs = run_all(engine, PROMPTS, [SamplingParams(max_tokens=n, temperature=0.0) for n in lengths])
    assert [o.token_ids for o in outs] == [recompute_greedy(model, p, n) for p, n in zip(PROMPTS, lengths)]
    torch._dynamo.reset()
