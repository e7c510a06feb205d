"""The Hugging Face peers of bench/serve.py: `generate_batch` (transformers' continuous batching
over a paged cache) and batched `generate` (left-padded), on the same exported weights.

Both take prompts as token-id lists and generate exactly `max_new_tokens` per prompt (eos is
disabled), so their tokens/s compare like for like with astrai's fixed-length run.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import common


def load_model(hf_dir: str, device: str, dtype: str = "bfloat16") -> Any:
    """The exported Qwen3 directory in `dtype` (float32 on the CPU) with SDPA attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, attn_implementation="sdpa")
    experts = getattr(model.config, "_experts_implementation", None)
    if getattr(model.config, "num_experts_per_tok", None) and experts:   # MoE: say which expert path HF ran
        common.log(f"hf experts_implementation={experts}")
    return model.to(device).eval()


def sampling(temperature: float) -> dict[str, Any]:
    """Greedy, or plain temperature sampling (HF's default top_k=50 switched off, as astrai has none)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def generate_batch_throughput(model: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                              device: str) -> dict[str, Any]:
    """tokens/s of one `generate_batch` call, timed from HF's own request stamps (first request
    created -> last finished): that leaves out the warm-up it runs on entry, as astrai's warm-up
    is left out of its figure."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=-1,  # -1: eos disabled
                              pad_token_id=model.config.pad_token_id, **sampling(temperature))
    cb_config = None
    if device != "cuda":
        # On the CPU HF sizes its cache from host memory (minutes to allocate): give it a small one.
        names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        page = {"page_size": 16} if "page_size" in names else {"block_size": 16}  # renamed after 5.17
        pages = sum(-(-(len(p) + max_new_tokens) // 16) for p in prompts) + 8
        cb_config = ContinuousBatchingConfig(num_blocks=pages, max_batch_tokens=256, **page)
    start = time.perf_counter()
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config,
                               progress_bar=False)
    wall = time.perf_counter() - start
    results = list(out.values())
    tokens = sum(len(r.generated_tokens) for r in results)
    ends = [r.lifespan[1] for r in results if r.lifespan[1] > 0]
    stamped = bool(results) and len(ends) == len(results)
    span = max(ends) - min(r.created_time for r in results) if stamped else wall
    problems = []
    errors = [r.error for r in results if r.error]
    if errors or len(results) != len(prompts):
        problems.append(f"{len(errors)} errors, {len(prompts) - len(results)} missing: {errors[:1]}")
    if tokens != len(results) * max_new_tokens:
        problems.append(f"{tokens} tokens, expected {len(results) * max_new_tokens}")
    return {"tps": tokens / span if tokens else None, "requests": len(results), "wall": wall,
            "stamped": stamped, "problems": problems}


def generate_batch_within(model: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                          device: str, budget_s: float, probe: int = 32) -> dict[str, Any]:
    """generate_batch on as many of `prompts` as fit the time budget: first `probe` of them; then,
    since a batch k times wider takes at most k times longer (at least as long), the most
    requests that surely fit (all of them when the budget allows 8x the probe's time)."""
    first = generate_batch_throughput(model, prompts[:probe], max_new_tokens, temperature, device)
    n = min(len(prompts), probe * max(1, int(budget_s / max(first["wall"], 1e-9))))
    if n <= probe:
        return first
    return generate_batch_throughput(model, prompts[:n], max_new_tokens, temperature, device)


def generate_throughput(model: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                        device: str, batch_size: int, budget_s: float) -> dict[str, Any]:
    """tokens/s of batched `generate`: prompts sorted by length (less padding), left-padded, one
    batch after another while the time budget allows another batch."""
    import torch

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    prompts = sorted(prompts, key=len)
    budget = common.Budget(budget_s)
    kwargs = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "pad_token_id": pad,
              **sampling(temperature)}

    def run(batch: list[list[int]], **extra: Any) -> tuple[float, int]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        secs, out = common.timed(lambda: model.generate(input_ids=ids, attention_mask=mask, **{**kwargs, **extra}),
                                 device)
        return secs, (out.shape[1] - width) * len(batch)

    with torch.no_grad():
        run(prompts[:2], max_new_tokens=4, min_new_tokens=4)  # warm-up
        secs = tokens = done = 0
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            if done and budget.left() < secs / done * len(batch):
                break
            t, n = run(batch)
            secs, tokens, done = secs + t, tokens + n, done + len(batch)
    return {"tps": tokens / secs, "requests": done}
