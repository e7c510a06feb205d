"""Serving benchmark: astrai's engine and daemon against Hugging Face transformers, same GPU, same
random-weight model, same requests, one run. Prints one table and writes JSON.

    python bench/serve.py [--preset qwen3-0.6b] [--num-requests 256] [--workloads W1,W2,W3,W4,W5,W6]
                          [--json out.json] [--skip-peer] [--tiny]
    python bench/serve.py --workloads W7          structured output (not in the default set)

    python bench/serve.py --preset qwen3-moe-small --workloads W1    the mixture-of-experts row
    python bench/serve.py --tiny --preset moe-tiny --workloads W1    its CPU smoke run

W1 throughput   N requests, prompt and output lengths each uniform in 100-1024 (seed 0, ignore_eos):
                astrai output tok/s. Like-for-like vs HF: every system generates a FIXED 256 tokens
                per request; HF `generate_batch` (continuous batching, paged) and batched
                `generate` (left-padded, batches sorted by prompt length).
W2 prefix       N requests = one 2,000-token system prompt + a 50-150-token question, 64 output
                tokens: output tok/s with the radix prefix cache on vs off (cold cache each run).
W3 latency      batch 1, 512-token prompt, 256 output tokens: decode ms/token vs the memory
                roofline (weight bytes + average KV bytes) / device copy bandwidth measured here.
W4 online       the W1 requests through `astrai serve`'s OpenAI REST facade, streamed with the
                `openai` AsyncOpenAI client at a fixed request rate: TTFT/TPOT p50/p99 and
                output tok/s vs W1 offline.
W5 long prompts 64 requests, prompts uniform in 4000-8000, 128 output tokens: output tok/s, and the
                prefill alone (the same prompts, 1 output token) in TFLOP/s and MFU (matmuls
                2 x weights x tokens, causal attention 2 x layers x heads x head_dim x L^2 a prompt).
W6 one long     one 16,384-token prompt, 1 output token: time to first token at the engine's
                chunking, beside a Hugging Face SDPA forward of the same tokens (last logits only).
W7 structured   the W1 requests with every 4th under a JSON Schema (an array of objects that cannot
                close within max_tokens, so each constrained request decodes exactly as long as in
                W1): output tok/s of the other 75% beside the same requests in W1 with none
                constrained, same process; and time to first token of a request whose (nested)
                schema is new, so compiled on the way, vs the same schema again, from the cache.

S startup      `LLM(model_dir)` twice, each in a fresh process over one fresh compile-cache directory:
                the first start is cold (Triton and torch.compile compile everything), the second
                warm (both read their on-disk caches, as every later `astrai serve` does).

Every `astrai` row runs the engine at its defaults (what `astrai serve --model DIR` gives: batch
limits sized from the GPU, CUDA graphs, compiled decode); W1 also runs with `enforce_eager=True`
(labelled). Engine flags given here (--max-num-seqs, --engine-arg ...) apply to every astrai row.

--profile runs each offline workload once more under torch.profiler and once under cProfile
and prints where its time goes (kernels by GPU time, host functions by own time).

Each system runs in its own process on the GPU (see common.run_isolated); --tiny runs everything
at toy sizes in-process on the CPU (the smoke test). Token ids are random; the model directory
carries a synthetic tokenizer covering the whole vocabulary so every generated id has text.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Row, key, log  # noqa: E402

FIRST_ID = 5  # ids below are the tokenizer's special tokens: prompts are drawn above them


@dataclass(frozen=True)
class Sizes:
    num_requests: int = 256                 # requests in W1, W2 and W4
    prompt_range: tuple[int, int] = (100, 1024)  # W1 prompt lengths, uniform, inclusive
    output_range: tuple[int, int] = (100, 1024)  # W1 output lengths, uniform, inclusive
    fixed_output: int = 256                 # W1 like-for-like output length (all systems)
    shared_prefix: int = 2000               # W2 shared system-prompt length
    question_range: tuple[int, int] = (50, 150)  # W2 unique question lengths
    w2_output: int = 64                     # W2 output tokens per request
    w3_prompt: int = 512                    # W3 prompt length
    w3_output: int = 256                    # W3 output tokens
    w5_requests: int = 64                   # W5 requests
    w5_prompt_range: tuple[int, int] = (4000, 8000)  # W5 prompt lengths, uniform, inclusive
    w5_output: int = 128                    # W5 output tokens per request
    w6_prompt: int = 16384                  # W6 prompt length


FULL = Sizes()
TINY = Sizes(num_requests=6, prompt_range=(8, 32), output_range=(4, 12), fixed_output=8, shared_prefix=48,
             question_range=(4, 12), w2_output=4, w3_prompt=16, w3_output=8, w5_requests=3,
             w5_prompt_range=(40, 80), w5_output=4, w6_prompt=96)


def sizes_from(data: dict[str, Any]) -> Sizes:
    return Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ---- the requests (deterministic: every process draws the same ones) --------------------------

def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def w1_requests(s: Sizes, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(0)
    return [(_ids(rng, rng.randint(*s.prompt_range), vocab), rng.randint(*s.output_range))
            for _ in range(s.num_requests)]


def w2_prompts(s: Sizes, vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    prefix = _ids(rng, s.shared_prefix, vocab)
    return [prefix + _ids(rng, rng.randint(*s.question_range), vocab) for _ in range(s.num_requests)]


def w3_prompt(s: Sizes, vocab: int) -> list[int]:
    return _ids(random.Random(2), s.w3_prompt, vocab)


def w5_prompts(s: Sizes, vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    return [_ids(rng, rng.randint(*s.w5_prompt_range), vocab) for _ in range(s.w5_requests)]


def w6_prompt(s: Sizes, vocab: int) -> list[int]:
    return _ids(random.Random(6), s.w6_prompt, vocab)


def long_model_len(s: Sizes) -> int:
    """max_model_len for W5 and W6: the next power of two above their longest sequence."""
    longest = max(s.w5_prompt_range[1] + s.w5_output, s.w6_prompt + 1)
    return 1 << (longest - 1).bit_length()


def mlp_weights_per_token(config: Any, layer: int) -> int:
    """Weights one token multiplies in block `layer`'s MLP: a SwiGLU, or the router and the top-k
    experts of a MoE layer (the others are not touched)."""
    if config.is_moe_layer(layer):
        return config.dim * config.n_experts + config.n_experts_per_token * 3 * config.dim * config.resolved_moe_dim_ffn
    return 3 * config.dim * config.dim_ffn


def prefill_flops(config: Any, lengths: list[int]) -> float:
    """FLOPs of prefilling prompts of these lengths: 2 x matmul weights a token (the LM head on the
    last token only, as the engine computes it; a MoE layer's active experts only) + causal
    attention, QK^T and PV over L(L+1)/2 pairs."""
    hd = config.resolved_head_dim
    attn = config.dim * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    linear = 2 * sum(attn + mlp_weights_per_token(config, i) for i in range(config.n_layers))
    head = 2 * config.dim * config.vocab_size
    attention = sum(4 * config.n_layers * config.n_heads * hd * n * (n + 1) / 2 for n in lengths)
    return linear * sum(lengths) + head * len(lengths) + attention


# Metric names depend on the sizes, so phases and placeholders agree on the row keys.
def var_metric(s: Sizes) -> str:
    return f"output tok/s ({s.output_range[0]}-{s.output_range[1]} out)"


def fixed_metric(s: Sizes) -> str:
    return f"output tok/s ({s.fixed_output} out)"


CACHE_ON, CACHE_OFF = "astrai (prefix cache on)", "astrai (prefix cache off)"
HF_CB, HF_GEN, HF_SDPA = "hf generate_batch", "hf generate", "hf sdpa forward"
EAGER = "astrai --enforce-eager"
COLD, WARM = "astrai cold start", "astrai warm start"
TTFT = "time to first token ms"
W7_FREE, W7_MIXED = "astrai (none constrained)", "astrai (25% JSON schema)"
W7_METRIC = "unconstrained output tok/s"
W7_NEW, W7_CACHED = "astrai (new schema)", "astrai (cached schema)"
# W7's constrained requests: a log of objects that needs 100,000 entries, so it never closes (nor
# allows eos) inside any max_tokens here; every token is masked. W7_TTFT_SCHEMA: the request whose
# first token waits for its compile (a fresh "title" each time makes it a new grammar).
W7_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["log"],
             "properties": {"log": {"type": "array", "minItems": 100000, "items": {
                 "type": "object", "additionalProperties": False, "required": ["word", "n"],
                 "properties": {"word": {"enum": ["alpha", "beta", "gamma"]},
                                "n": {"type": "integer", "minimum": 0, "maximum": 9}}}}}}
W7_TTFT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "owner", "tags", "status"],
                  "properties": {
                      "id": {"type": "integer", "minimum": 0},
                      "owner": {"type": "object", "required": ["name", "zip"], "additionalProperties": False,
                                "properties": {"name": {"type": "string", "maxLength": 40},
                                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
                      "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
                      "status": {"enum": ["open", "closed", "pending"]}}}


def repeated(fn: Any, repeats: int, budget_s: float) -> list[Any]:
    """fn() at least once, then again while under `repeats` runs and the budget allows one more."""
    out, start = [], time.perf_counter()
    while True:
        out.append(fn())
        elapsed = time.perf_counter() - start
        if len(out) >= repeats or elapsed * (len(out) + 1) / len(out) > budget_s:
            return out


# ---- phases: astrai offline (W1, W3, W2 cache on), W2 cache off -------------------------------

def copy_bandwidth(device: str) -> tuple[float, int]:
    """(bytes moved per second, read + write, by a large device-to-device copy; its size)."""
    import torch

    n = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    iters = 10
    secs, _ = common.timed(lambda: [dst.copy_(src) for _ in range(iters)], device)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * n * iters / secs, n


def weight_read_bytes(model_dir: str) -> tuple[int, Any]:
    """(bytes of weights one decode step reads, the config): the safetensors payload, less an
    untied input embedding (a row lookup, not a full read) and, at batch 1, the experts a token
    is not routed to (n_experts - top-k of every MoE layer)."""
    from astrai_train.model import ModelConfig

    config = ModelConfig.from_json(model_dir)
    total = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    if not config.tie_weight:
        total -= config.vocab_size * config.dim * 2
    sparse = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    total -= sparse * (config.n_experts - config.n_experts_per_token) * 3 * config.dim * config.resolved_moe_dim_ffn * 2
    return total, config


def _engine_runner(spec: dict[str, Any], **overrides: Any) -> Any:
    """An LLM over the model directory and run(prompts, output lengths) -> timing of one batch."""
    from astrai_serve import LLM, SamplingParams

    llm = LLM(spec["model_dir"], **{**spec["engine"], **overrides})
    engine = llm.engine.config
    log(f"engine: max_num_seqs={engine.max_num_seqs}, max_num_batched_tokens={engine.max_num_batched_tokens}, "
        f"graphs={engine.resolved_cuda_graphs()}, compile_decode={engine.resolved_compile_decode()}, "
        f"fused_kernels={engine.resolved_fused_kernels()}; {llm.engine.startup.describe()}")

    def run(prompts: list[list[int]], outs: list[int]) -> dict[str, Any]:
        llm.engine.reset_prefix_cache()  # every run starts cold: a repeat must not hit the last run's cache
        params = [SamplingParams(max_tokens=n, temperature=spec["temperature"], ignore_eos=True) for n in outs]
        secs, res = common.timed(lambda: llm.generate(prompts, params), spec["device"])
        tokens = sum(len(r.outputs[0].token_ids) for r in res)
        if tokens != sum(outs):
            raise RuntimeError(f"asked for {sum(outs)} tokens with ignore_eos, got {tokens}")
        return {"secs": secs, "tps": tokens / secs, "prompt": sum(r.prompt_tokens for r in res),
                "cached": sum(r.cached_tokens for r in res)}
    run.config = engine
    return run


def profile(spec: dict[str, Any], label: str, fn: Any, rows: int = 25) -> None:
    """--profile: fn() once under torch.profiler (the kernels with the most GPU time; on a CPU the
    ops with the most CPU time) and once under cProfile (the host functions with the most own
    time), printed to the log. Nothing without --profile."""
    if not spec["profile"]:
        return
    import cProfile
    import io
    import pstats

    import torch

    cuda = spec["device"] == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    print(f"\n--profile {label}: by self {'GPU' if cuda else 'CPU'} time, one run", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=rows), flush=True)
    host, text = cProfile.Profile(), io.StringIO()
    host.runcall(fn)
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(rows)
    print(f"--profile {label}: host functions by own time, one run\n{text.getvalue()}", flush=True)


def phase_astrai(spec: dict[str, Any], out: common.Sink) -> None:
    s, vocab, wl = sizes_from(spec["sizes"]), spec["vocab"], spec["workloads"]
    reps, budget = spec["repeats"], spec["budget_s"]
    bandwidth, copied = copy_bandwidth(spec["device"]) if "W3" in wl else (0.0, 0)  # before the KV cache is allocated
    run = _engine_runner(spec)
    reqs = w1_requests(s, vocab)
    run([p for p, _ in reqs[:32]], [min(n, 32) for _, n in reqs[:32]])  # warm-up: kernels, allocator
    how = f"greedy={spec['temperature'] == 0}, ignore_eos"
    if "W1" in wl:
        runs = repeated(lambda: run([p for p, _ in reqs], [n for _, n in reqs]), reps, budget)
        out.add(Row("W1", "astrai", var_metric(s), common.median([r["tps"] for r in runs]),
                    note=f"{s.num_requests} req, prompt {s.prompt_range[0]}-{s.prompt_range[1]}, {how}; "
                         f"median of {len(runs)}"))
        profile(spec, "W1", lambda: run([p for p, _ in reqs], [n for _, n in reqs]))
        runs = repeated(lambda: run([p for p, _ in reqs], [s.fixed_output] * len(reqs)), reps, budget)
        out.add(Row("W1", "astrai", fixed_metric(s), common.median([r["tps"] for r in runs]),
                    peers=[key("W1", HF_CB, fixed_metric(s)), key("W1", HF_GEN, fixed_metric(s))],
                    note=f"same prompts; median of {len(runs)}"))
    if "W3" in wl:
        import torch

        from astrai_train.model import kv_layout

        prompt = w3_prompt(s, vocab)
        first = repeated(lambda: run([prompt], [1]), max(reps, 3), budget)
        full = repeated(lambda: run([prompt], [s.w3_output]), max(reps, 3), budget)
        ttft = common.median([r["secs"] for r in first])
        decode_ms = (common.median([r["secs"] for r in full]) - ttft) / (s.w3_output - 1) * 1e3
        weights, config = weight_read_bytes(spec["model_dir"])
        kv_avg = kv_layout(config).bytes_per_token(config.n_layers, torch.bfloat16) * (s.w3_prompt + s.w3_output / 2)
        out.add(
            Row("W3", "astrai", "decode ms/token", decode_ms, peers=[key("W3", "roofline", "decode ms/token")],
                note=f"batch 1, {s.w3_prompt}-token prompt, {s.w3_output} out: (full - first-token time) / "
                     f"{s.w3_output - 1}; ratio > 1 = slower than the roofline"),
            Row("W3", "roofline", "decode ms/token", (weights + kv_avg) / bandwidth * 1e3,
                note=f"(weights {weights / 1e9:.3f} GB + avg KV {kv_avg / 1e6:.1f} MB) / copy bandwidth"),
            Row("W3", "astrai", "first token ms", ttft * 1e3, note=f"{s.w3_prompt}-token prompt, cold cache"),
            Row("W3", "device", "copy GB/s (read+write)", bandwidth / 1e9,
                note=f"device-to-device copy of {copied >> 20} MiB, x10"))
        profile(spec, "W3", lambda: run([prompt], [s.w3_output]))
    if "W2" in wl:
        out.add(*_w2_rows(run, spec, CACHE_ON))


def _w2_rows(run: Any, spec: dict[str, Any], system: str) -> list[Row]:
    s = sizes_from(spec["sizes"])
    prompts = w2_prompts(s, spec["vocab"])
    runs = repeated(lambda: run(prompts, [s.w2_output] * len(prompts)), spec["repeats"], spec["budget_s"])
    note = (f"{s.num_requests} req, {s.shared_prefix}-token shared prefix + {s.question_range[0]}-"
            f"{s.question_range[1]} question, {s.w2_output} out, cold cache; median of {len(runs)}")
    rows = [Row("W2", system, "output tok/s", common.median([r["tps"] for r in runs]), note=note,
                peers=[key("W2", CACHE_OFF, "output tok/s")] if system == CACHE_ON else [])]
    if system == CACHE_ON:
        rows.append(Row("W2", system, "prompt tokens from cache %",
                        100 * runs[-1]["cached"] / max(runs[-1]["prompt"], 1)))
        profile(spec, "W2 (prefix cache on)", lambda: run(prompts, [s.w2_output] * len(prompts)))
    return rows


def phase_astrai_nocache(spec: dict[str, Any], out: common.Sink) -> None:
    s = sizes_from(spec["sizes"])
    run = _engine_runner(spec, enable_prefix_cache=False)
    prompts = w2_prompts(s, spec["vocab"])[:8]
    run(prompts, [4] * len(prompts))  # warm-up
    out.add(*_w2_rows(run, spec, CACHE_OFF))


def phase_astrai_long(spec: dict[str, Any], out: common.Sink) -> None:
    """W5 and W6: an engine of the same settings (a max_model_len set for the others grows to hold
    their prompts; the default, the model's, holds them already)."""
    import torch

    from astrai_train.model import ModelConfig

    s, vocab, wl = sizes_from(spec["sizes"]), spec["vocab"], spec["workloads"]
    run = _engine_runner(spec, **({"max_model_len": long_model_len(s)} if "max_model_len" in spec["engine"] else {}))
    config = ModelConfig.from_json(spec["model_dir"])
    cuda = spec["device"] == "cuda"
    peak = None
    if cuda:
        from astrai_train.objectives.throughput import peak_flops

        peak = peak_flops(torch.cuda.get_device_name())
    prompts = w5_prompts(s, vocab)
    run(prompts[:2], [2, 2])  # warm-up: the long-prompt kernels compile here, not in a timed run
    if "W5" in wl:
        fills = repeated(lambda: run(prompts, [1] * len(prompts)), spec["repeats"], spec["budget_s"])
        secs = common.median([r["secs"] for r in fills])
        tflops = prefill_flops(config, [len(p) for p in prompts]) / secs / 1e12
        note = (f"{len(prompts)} prompts of {s.w5_prompt_range[0]}-{s.w5_prompt_range[1]} tokens, 1 output token; "
                f"median of {len(fills)}")
        out.add(Row("W5", "astrai", "prefill TFLOP/s", tflops, note=note),
                Row("W5", "astrai", "prefill MFU %", 100 * tflops * 1e12 / peak if peak else None,
                    note=f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak FLOP/s known for this device"))
        runs = repeated(lambda: run(prompts, [s.w5_output] * len(prompts)), spec["repeats"], spec["budget_s"])
        out.add(Row("W5", "astrai", "output tok/s", common.median([r["tps"] for r in runs]),
                    note=f"{s.w5_output} out each, ignore_eos; median of {len(runs)}"))
    if "W6" in wl:
        prompt = w6_prompt(s, vocab)
        ttfts = repeated(lambda: run([prompt], [1]), spec["repeats"], spec["budget_s"])
        out.add(Row("W6", "astrai", TTFT, common.median([r["secs"] for r in ttfts]) * 1e3,
                    peers=[key("W6", HF_SDPA, TTFT)],
                    note=f"{s.w6_prompt}-token prompt, cold cache, chunks of {run.config.max_num_batched_tokens} "
                         f"tokens; median of {len(ttfts)}"))


def phase_astrai_eager(spec: dict[str, Any], out: common.Sink) -> None:
    """W1 with enforce_eager=True: no CUDA graphs, no torch.compile (the fused kernels stay)."""
    s, vocab = sizes_from(spec["sizes"]), spec["vocab"]
    run = _engine_runner(spec, enforce_eager=True)
    reqs = w1_requests(s, vocab)
    run([p for p, _ in reqs[:32]], [min(n, 32) for _, n in reqs[:32]])  # warm-up
    runs = repeated(lambda: run([p for p, _ in reqs], [n for _, n in reqs]), spec["repeats"], spec["budget_s"])
    out.add(Row("W1", EAGER, var_metric(s), common.median([r["tps"] for r in runs]),
                peers=[key("W1", "astrai", var_metric(s))],
                note=f"the W1 requests, engine defaults + enforce_eager=True; median of {len(runs)}; "
                     "ratio < 1 = slower than the defaults"))
    profile(spec, "W1 --enforce-eager", lambda: run([p for p, _ in reqs], [n for _, n in reqs]))


def phase_astrai_startup(spec: dict[str, Any], out: common.Sink) -> None:
    """One start of `LLM(model_dir)` over spec["startup_cache_dir"] (cold when it is empty)."""
    import os
    import time

    from astrai_serve import LLM
    from astrai_serve.engine.startup import CACHE_VARS

    cache = Path(spec["startup_cache_dir"])
    if spec["device"] == "cuda":   # this process only (isolated): the fresh directory, whatever the user set
        for name, var in CACHE_VARS.items():
            os.environ[var] = str(cache / name)
    start = time.perf_counter()
    llm = LLM(spec["model_dir"], compile_cache_dir=str(cache), **spec["engine"])
    secs = time.perf_counter() - start
    t = llm.engine.startup
    state = "unused (nothing compiles here)" if t.cache is None else "warm" if t.cache.warm else "cold"
    out.add(Row("S", WARM if spec["startup_run"] else COLD, "startup s", secs,
                note=f"LLM(model_dir) to ready: weights {t.load_s:.1f} s, KV cache {t.kv_cache_s:.1f} s, "
                     f"compile + CUDA graphs {t.graphs_s:.1f} s; compile cache {state}"))


# ---- phases: the Hugging Face peers (serve_hf.py) ----------------------------------------------

def _hf_prompts(s: Sizes, spec: dict[str, Any]) -> list[list[int]]:
    prompts = [p for p, _ in w1_requests(s, spec["vocab"])]
    return prompts[: spec["hf_requests"] or len(prompts)]


def phase_hf_cb(spec: dict[str, Any], out: common.Sink) -> None:
    import serve_hf

    s = sizes_from(spec["sizes"])
    model = serve_hf.load_model(spec["hf_dir"], spec["device"])
    r = serve_hf.generate_batch_within(model, _hf_prompts(s, spec), s.fixed_output, spec["temperature"],
                                       spec["device"], spec["peer_budget_s"], probe=min(32, s.num_requests))
    note = (f"{r['requests']}/{s.num_requests} requests (time budget {spec['peer_budget_s']:.0f} s); timed by "
            f"HF's request stamps{'' if r['stamped'] else ' (absent: wall time)'}; {r['wall']:.0f} s wall incl. "
            "its warm-up")
    out.add(Row("W1", HF_CB, fixed_metric(s), r["tps"], note=note + "".join(f"; {p}" for p in r["problems"])))


def phase_hf_generate(spec: dict[str, Any], out: common.Sink) -> None:
    import serve_hf

    s = sizes_from(spec["sizes"])
    model = serve_hf.load_model(spec["hf_dir"], spec["device"])
    r = serve_hf.generate_throughput(model, _hf_prompts(s, spec), s.fixed_output, spec["temperature"],
                                     spec["device"], spec["hf_batch_size"], spec["peer_budget_s"])
    out.add(Row("W1", HF_GEN, fixed_metric(s), r["tps"],
                note=f"{r['requests']}/{s.num_requests} requests (time budget {spec['peer_budget_s']:.0f} s), batches "
                     f"of {spec['hf_batch_size']}, left-padded, sorted by prompt length"))


def phase_hf_sdpa(spec: dict[str, Any], out: common.Sink) -> None:
    """W6's peer: one HF forward (SDPA attention) of the whole prompt, logits of its last token."""
    import torch

    import serve_hf

    s = sizes_from(spec["sizes"])
    model = serve_hf.load_model(spec["hf_dir"], spec["device"])
    ids = torch.tensor([w6_prompt(s, spec["vocab"])], device=spec["device"])

    def forward() -> dict[str, Any]:
        with torch.no_grad():
            secs, _ = common.timed(lambda: model(ids, logits_to_keep=1, use_cache=False), spec["device"])
        return {"secs": secs}

    forward()  # warm-up
    runs = repeated(forward, spec["repeats"], spec["peer_budget_s"])
    out.add(Row("W6", HF_SDPA, TTFT, common.median([r["secs"] for r in runs]) * 1e3,
                note=f"one forward of {s.w6_prompt} tokens, no KV cache kept; median of {len(runs)}"))


def phase_astrai_structured(spec: dict[str, Any], out: common.Sink) -> None:
    """W7: the cost of structured output to its unconstrained neighbours, and a new schema's TTFT."""
    from astrai_serve import LLM, SamplingParams
    from astrai_serve.engine.structured_spec import StructuredOutput

    s, vocab, device, temp = sizes_from(spec["sizes"]), spec["vocab"], spec["device"], spec["temperature"]
    llm = LLM(spec["model_dir"], **spec["engine"])
    reqs = w1_requests(s, vocab)
    prompts = [p for p, _ in reqs]
    constrained = set(range(0, len(reqs), 4))
    schema = StructuredOutput(json=json.dumps(W7_SCHEMA))
    plain = [SamplingParams(max_tokens=n, temperature=temp, ignore_eos=True) for _, n in reqs]
    mixed = [SamplingParams(max_tokens=n, temperature=temp, structured=schema) if i in constrained else plain[i]
             for i, (_, n) in enumerate(reqs)]

    def run(params: list[Any]) -> dict[str, Any]:
        llm.engine.reset_prefix_cache()
        secs, res = common.timed(lambda: llm.generate(prompts, params), device)
        if sum(len(r.token_ids) for r in res) != sum(n for _, n in reqs):
            raise RuntimeError("W7: a request ended before max_tokens")
        free = sum(len(r.token_ids) for i, r in enumerate(res) if i not in constrained)
        return {"tps": free / secs, "secs": secs}

    llm.generate(prompts[:8], [replace(p, max_tokens=min(p.max_tokens, 16)) for p in mixed[:8]])  # warm-up
    reps, budget = spec["repeats"], spec["budget_s"]
    base = repeated(lambda: run(plain), reps, budget)
    with_schema = repeated(lambda: run(mixed), reps, budget)
    note = f"the W1 requests; {len(constrained)}/{len(reqs)} under a JSON schema in the second; median of "
    out.add(Row("W7", W7_FREE, W7_METRIC, common.median([r["tps"] for r in base]), note=note + str(len(base))),
            Row("W7", W7_MIXED, W7_METRIC, common.median([r["tps"] for r in with_schema]),
                peers=[key("W7", W7_FREE, W7_METRIC)],
                note=note + f"{len(with_schema)}; ratio < 1 = the constrained neighbours cost that much"))
    prompt = prompts[0][:64]

    def first_token(title: str) -> float:
        structured = StructuredOutput(json=json.dumps({"title": title, **W7_TTFT_SCHEMA}))
        secs, _ = common.timed(lambda: llm.generate([prompt], SamplingParams(max_tokens=1, structured=structured)),
                               device)
        return secs

    fresh, cached = [], []
    for i in range(max(reps, 3)):
        fresh.append(first_token(f"w7-{i}"))      # compiled for this request
        cached.append(first_token(f"w7-{i}"))     # the same schema: from the cache
    compiler = llm.engine._structured.compiler
    out.add(Row("W7", W7_NEW, TTFT, common.median(fresh) * 1e3, peers=[key("W7", W7_CACHED, TTFT)],
                note=f"a {len(prompt)}-token prompt, 1 token, a nested schema never seen; median of {len(fresh)}; "
                     f"{compiler.num_compiled} grammars compiled in this process"),
            Row("W7", W7_CACHED, TTFT, common.median(cached) * 1e3, note="the same request again"))


PHASES = {"astrai": phase_astrai, "astrai-nocache": phase_astrai_nocache, "astrai-long": phase_astrai_long,
          "astrai-eager": phase_astrai_eager, "astrai-startup": phase_astrai_startup,
          "astrai-structured": phase_astrai_structured,
          "hf-cb": phase_hf_cb, "hf-generate": phase_hf_generate, "hf-sdpa": phase_hf_sdpa}


def expected_rows(phase: str, s: Sizes, wl: list[str]) -> list[Row]:
    """The rows a phase is there to produce: shown valueless when it fails before them."""
    rows = {"astrai": [Row("W1", "astrai", var_metric(s), None), Row("W1", "astrai", fixed_metric(s), None)]
            if "W1" in wl else [],
            "astrai-nocache": [Row("W2", CACHE_OFF, "output tok/s", None)],
            "astrai-eager": [Row("W1", EAGER, var_metric(s), None)],
            "astrai-startup": [Row("S", "astrai", "startup s", None)],
            "astrai-structured": [Row("W7", W7_MIXED, W7_METRIC, None), Row("W7", W7_NEW, TTFT, None)],
            "astrai-long": ([Row("W5", "astrai", "prefill TFLOP/s", None), Row("W5", "astrai", "output tok/s", None)]
                            if "W5" in wl else []) + ([Row("W6", "astrai", TTFT, None)] if "W6" in wl else []),
            "hf-cb": [Row("W1", HF_CB, fixed_metric(s), None)],
            "hf-generate": [Row("W1", HF_GEN, fixed_metric(s), None)],
            "hf-sdpa": [Row("W6", HF_SDPA, TTFT, None)]}[phase]
    if phase == "astrai":
        rows += [Row("W3", "astrai", "decode ms/token", None)] if "W3" in wl else []
        rows += [Row("W2", CACHE_ON, "output tok/s", None)] if "W2" in wl else []
    return rows


# ---- W4: the daemon under load (serve_online.py) ----------------------------------------------

def start_daemon(spec: dict[str, Any], extra_env: dict[str, str]) -> Any:
    import serve_online

    return serve_online.Daemon(spec["model_dir"], spec["engine"], extra_env, spec.get("serve_flags", []))


def fresh_ids(requests: list[tuple[list[int], int]], run: int, vocab: int) -> list[tuple[list[int], int]]:
    """The same requests (lengths) with every prompt id moved by `run` within [FIRST_ID, vocab): a
    repeat against one daemon then shares no prefix with an earlier run, so its radix cache
    cannot serve the prompts (the offline runs reset their engine's cache instead)."""
    span = vocab - FIRST_ID
    return [([FIRST_ID + (t - FIRST_ID + run) % span for t in p], n) for p, n in requests]


def run_online(spec: dict[str, Any], rate: float, client_procs: int, daemon: Any) -> list[Row]:
    import serve_online

    s = sizes_from(spec["sizes"])
    log("phase online (W4): astrai serve + openai client")
    requests = w1_requests(s, spec["vocab"])
    try:
        daemon.wait_ready(spec["phase_timeout_s"])
        log(f"astrai serve ready at {daemon.url}")
        count = iter(range(spec["repeats"]))

        def one_run() -> dict[str, Any]:
            # The daemon's own CPU over the run, by process: which one is saturated, if any.
            before, start = daemon.cpu(), time.time()
            run = serve_online.load_test(daemon.url, daemon.model, fresh_ids(requests, next(count), spec["vocab"]),
                                         rate, client_procs, spec["temperature"], spec["phase_timeout_s"])
            after, wall = daemon.cpu(), time.time() - start
            run["daemon_busy"] = {k: (after[k] - before[k]) / wall for k in after}
            return run

        runs = repeated(one_run, spec["repeats"], spec["budget_s"])
        core_ttft = serve_online.server_median(daemon.url, "astrai_time_to_first_token_seconds")
    finally:
        daemon.stop()
    log("W4 done: " + ", ".join(f"{x['tps']:,.0f}" if "tps" in x else "failed" for x in runs) + " tok/s")
    # The run of median throughput speaks for the others (its latencies with it); a failed run
    # (no tps) sorts first so that a mostly failing W4 shows its failure.
    r = sorted(runs, key=lambda x: x.get("tps", -1.0))[(len(runs) - 1) // 2]
    arrivals = "all sent at once" if math.isinf(rate) else f"{rate:g} req/s evenly spaced"
    note = (f"{r['ok']}/{r['sent']} ok, {arrivals}, openai AsyncOpenAI streaming, "
            f"{client_procs} client proc(s), client CPU busy <= {100 * r['cpu_busy']:.0f}%; run of median tok/s of "
            f"{len(runs)}")
    if "daemon_busy" in r:
        note += "; daemon CPU busy " + " ".join(f"{k} {100 * v:.0f}%" for k, v in r["daemon_busy"].items())
    if r["errors"]:
        note += f"; {len(r['errors'])} errors, first: {r['errors'][0]}"
    if "ttft_quarters" in r:
        log(f"W4 TTFT p50 by arrival quarter (ms): {', '.join(f'{t:.0f}' for t in r['ttft_quarters'])}; "
            f"latest send {r['send_lag_ms']:.0f} ms after its slot; the gRPC core's TTFT median <= "
            f"{'-' if core_ttft is None else f'{core_ttft * 1e3:.0f} ms'} (its /metrics, warm-up included)")
    if "tps" not in r:
        return [Row("W4", "astrai REST", "output tok/s", None, note=note)]
    return [
        Row("W4", "astrai REST", "output tok/s", r["tps"], peers=[key("W1", "astrai", var_metric(s))], note=note),
        Row("W4", "astrai REST", "TTFT p50 ms", r["ttft"][0]),
        Row("W4", "astrai REST", "TTFT p99 ms", r["ttft"][1]),
        Row("W4", "astrai REST", "TPOT p50 ms", r["tpot"][0]),
        Row("W4", "astrai REST", "TPOT p99 ms", r["tpot"][1]),
    ]


# ---- command line -----------------------------------------------------------------------------

WORKLOADS = ("S", "W1", "W2", "W3", "W4", "W5", "W6", "W7")
DEFAULT_WORKLOADS = ("S", "W1", "W2", "W3", "W4", "W5", "W6")   # W7 on request: it runs the W1 requests twice more


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/serve.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="model preset, random bf16 weights (default qwen3-0.6b; tiny with --tiny)")
    p.add_argument("--num-requests", type=int, default=None, help="requests in W1/W2/W4 (default 256)")
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--json", default="bench-serve.json", help="where to write the JSON results ('' for none)")
    p.add_argument("--skip-peer", action="store_true", help="do not run the Hugging Face peers")
    p.add_argument("--skip-eager", action="store_true", help="do not run W1 again with enforce_eager=True")
    p.add_argument("--tiny", action="store_true", help="toy sizes and the tiny preset, for a CPU smoke run")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every system (0 = greedy)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement, median reported, while the budget allows")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds per astrai measurement: repeats only while they fit (default 45)")
    p.add_argument("--peer-budget-s", type=float, default=None,
                   help="seconds for each HF peer: fewer requests when all would not fit (default 90)")
    p.add_argument("--hf-requests", type=int, default=None, help="give the HF peers only the first N requests (default all)")
    p.add_argument("--hf-batch-size", type=int, default=128, help="batch size of HF batched generate (default 128)")
    p.add_argument("--rate", type=float, default=64.0,
                   help="W4 request rate, requests/s (default 64; inf sends every request at once, as W1 starts them)")
    p.add_argument("--client-procs", type=int, default=None, help="W4 client processes (default 4; 1 with --tiny)")
    p.add_argument("--api-server-count", type=int, default=None,
                   help="W4: the daemon's REST facade processes (`astrai serve --api-server-count`; default its own, 1)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="engine: most sequences at once (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine: tokens per step (default: the engine's)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="engine: share of free GPU memory for KV")
    p.add_argument("--page-size", type=int, default=None, help="engine: tokens per KV page")
    p.add_argument("--attention-impl", default=None, help="engine: torch | triton")
    p.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="engine: torch.compile the captured decode step (default: the engine's, on with CUDA graphs)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig setting, e.g. decode_pdl=false (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="after each offline workload, one run under torch.profiler and one under cProfile, printed")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one process per system (default: on with CUDA, off on the CPU)")
    p.add_argument("--phase-timeout-s", type=float, default=300.0, help="stop a system's process after this long (default 300)")
    p.add_argument("--keep-dir", action="store_true", help="keep the temporary model directories")
    p.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--phase-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if bad:
        p.error(f"--workloads: unknown workload {bad[0]!r} (choose from {','.join(WORKLOADS)})")
    for name in ("num_requests", "repeats", "hf_batch_size", "hf_requests", "client_procs", "api_server_count"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.rate <= 0:
        p.error(f"--rate {args.rate}: must be > 0")
    args.engine_overrides = common.key_values(p, "--engine-arg", args.engine_arg)
    return args


def build_spec(args: argparse.Namespace, model_dir: Path, hf_dir: Path | None, vocab: int, device: str) -> dict[str, Any]:
    """Everything a phase process needs, as plain JSON."""
    sizes = TINY if args.tiny else FULL
    if args.num_requests:
        sizes = replace(sizes, num_requests=args.num_requests)
    longest = max(sizes.prompt_range[1] + max(sizes.output_range[1], sizes.fixed_output),
                  sizes.shared_prefix + sizes.question_range[1] + sizes.w2_output, sizes.w3_prompt + sizes.w3_output)
    # The engine's own defaults unless a flag says otherwise; the tiny CPU run keeps its batches
    # and page tables small so the smoke test stays quick.
    engine: dict[str, Any] = ({"max_num_seqs": 8, "max_num_batched_tokens": 256,
                               "max_model_len": 1 << (longest - 1).bit_length()} if args.tiny else {})
    for name in ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "page_size", "attention_impl",
                 "compile_decode"):
        if getattr(args, name) is not None:
            engine[name] = getattr(args, name)
    engine.update(args.engine_overrides)
    return {"model_dir": str(model_dir), "hf_dir": str(hf_dir) if hf_dir else None, "sizes": asdict(sizes),
            "vocab": vocab, "device": device, "engine": engine, "temperature": args.temperature,
            "repeats": args.repeats, "budget_s": args.budget_s or (20.0 if args.tiny else 45.0),
            "peer_budget_s": args.peer_budget_s or (20.0 if args.tiny else 90.0),
            "hf_requests": args.hf_requests, "hf_batch_size": args.hf_batch_size,
            "workloads": args.workloads.split(","), "phase_timeout_s": args.phase_timeout_s, "profile": args.profile,
            "serve_flags": [] if args.api_server_count is None else ["--api-server-count", str(args.api_server_count)]}


def main(argv: list[str] | None = None) -> int:
    return common.cli_main("bench/serve.py", parse_args, _main, argv)


def _main(args: argparse.Namespace) -> int:
    if args.phase:  # a child process measuring one system
        return common.phase_main(PHASES, args.phase, args.spec, args.phase_out)
    import torch

    device, threads_before, thread_env = common.run_setup(args.tiny)
    isolate = device == "cuda" if args.isolate is None else args.isolate
    env = common.environment()
    wl = args.workloads.split(",")
    peers = not args.skip_peer and bool({"W1", "W6"} & set(wl))
    preset = args.preset or ("tiny" if args.tiny else "qwen3-0.6b")
    workdir = Path(tempfile.mkdtemp(prefix="astrai-bench-serve-"))
    daemon = None
    try:
        log(f"building {preset} with random bf16 weights in {workdir}")
        model_dir = common.random_model_dir(preset, workdir / "model", dtype="bfloat16")
        hf_dir = None
        if peers:
            from astrai_train.model.hf_export import export_hf

            hf_dir = export_hf(model_dir, workdir / "hf", dtype=torch.bfloat16)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        spec = build_spec(args, model_dir, hf_dir, vocab, device)
        spec["startup_cache_dir"] = str(workdir / "compile-cache")
        sizes = sizes_from(spec["sizes"])
        phases = ["astrai-startup", "astrai-startup"] if "S" in wl else []    # cold, then warm
        phases += (["astrai"] if set(wl) & {"W1", "W2", "W3"} else []) + (["astrai-nocache"] if "W2" in wl else [])
        phases += ["astrai-eager"] if "W1" in wl and not args.skip_eager else []
        phases += ["astrai-long"] if set(wl) & {"W5", "W6"} else []
        phases += ["astrai-structured"] if "W7" in wl else []
        phases += ["hf-cb", "hf-generate"] if peers and "W1" in wl else []
        phases += ["hf-sdpa"] if peers and "W6" in wl else []
        rows: list[Row] = []
        # On the GPU the daemon starts after the other systems are done (its KV cache takes most of
        # the memory); on the CPU nothing is shared, so it boots while they run.
        daemon = start_daemon(spec, thread_env) if "W4" in wl and device == "cpu" else None
        for i, phase in enumerate(phases):
            got, error = common.run_phase(PHASES, phase, {**spec, "startup_run": i}, isolate, __file__,
                                          args.phase_timeout_s, workdir, thread_env)
            rows += common.fill_missing(got, expected_rows(phase, sizes, wl), error) if error else got
        if "W4" in wl:
            try:
                daemon = daemon or start_daemon(spec, thread_env)
                rows += run_online(spec, args.rate, args.client_procs or (1 if args.tiny else 4), daemon)
            except Exception as exc:
                rows.append(Row("W4", "astrai REST", "output tok/s", None, note=f"failed: {type(exc).__name__}: {exc}"))
        rows.sort(key=lambda r: r.workload)  # stable: each workload's rows keep their order
        settings = {**{k: v for k, v in spec.items() if k not in ("model_dir", "hf_dir")}, "preset": preset,
                    "rate": args.rate, "isolate": isolate}
        common.report("bench/serve.py", rows, env, settings, args.json or None)
    finally:
        if daemon is not None:
            daemon.stop()  # no-op when W4 stopped it already
        torch.set_num_threads(threads_before)
        if args.keep_dir:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
