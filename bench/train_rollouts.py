"""GRPO rollouts for bench/train.py --grpo-rollouts: group_size sampled completions per prompt,
as GRPOModule draws them, from the same random-weight model and prompts by three samplers:

  engine    astrai's serving engine in-process (objectives.rollout.RolloutSampler, backend engine:
            continuous batching over a paged KV cache, the model shared, not copied)
  generate  the model's own batched loop with a contiguous KV cache (RolloutSampler, backend
            generate: the plain loop GRPO falls back to)
  hf        HF `generate` on the left-padded batch of every sample (what TRL does without vLLM)

tokens/s counts the tokens actually generated (a sample may stop early at a stop token).
"""
from __future__ import annotations

import random
from typing import Any

import common
from common import Row, key

FIRST_ID = 5  # below: the tokenizer's special tokens
METRIC = "rollout tok/s"
SYSTEMS = {"engine": "astrai engine (in-process)", "generate": "astrai generate loop", "hf": "hf generate"}


def rollout_prompts(spec: dict[str, Any]) -> list[list[int]]:
    rng = random.Random(3)
    lo, hi = spec["rollout_prompt_range"]
    return [[rng.randrange(FIRST_ID, spec["vocab"]) for _ in range(rng.randint(lo, hi))]
            for _ in range(spec["rollout_prompts"])]


def phase_rollout(spec: dict[str, Any], out: common.Sink, backend: str) -> None:
    """Sample group_size completions per prompt, as GRPOModule does, and time it. engine and
    generate go through objectives.rollout.RolloutSampler, the very sampler GRPO training uses."""
    import torch

    device, g = spec["device"], spec["group_size"]
    prompts = rollout_prompts(spec)
    if backend == "hf":
        run = _hf_rollout(spec, prompts)
    else:
        from astrai_train.model import Transformer
        from astrai_train.objectives.rollout import RolloutSampler
        from astrai_train.tokenizer import Tokenizer

        dtype = getattr(torch, spec["rollout_dtype"]) if device == "cuda" else torch.float32
        model = Transformer.from_pretrained(spec["model_dir"], device=device, dtype=dtype)
        sampler = RolloutSampler(model, Tokenizer.from_pretrained(spec["model_dir"]), g, spec["rollout_tokens"],
                                 spec["temperature"], backend=backend, engine_args=spec["engine_args"])
        run = sampler.sample
    run(prompts, 1)  # warm-up on the same batch shape: engine start (sized for it), kernels, allocator
    runs = []        # (tok/s, tokens, seconds) per timed batch, each with its own seed
    for seed in range(spec["rollout_repeats"]):
        secs, completions = common.timed(lambda: run(prompts, 100 + seed), device)
        tokens = sum(len(c) for c in completions)
        runs.append((tokens / secs, tokens, secs))
    rate = common.median([r[0] for r in runs])
    peers = [key("rollout", SYSTEMS[b], METRIC) for b in ("generate", "hf")] if backend == "engine" else []
    out.add(Row("rollout", SYSTEMS[backend], METRIC, rate, peers=peers,
                note=f"{len(prompts)} prompts x {g} samples, up to {spec['rollout_tokens']} new tokens, "
                     f"T={spec['temperature']}, {spec['rollout_dtype'] if device == 'cuda' else 'float32'}; "
                     f"median of {len(runs)}: " + ", ".join(f"{n} tokens in {s:.1f} s" for _, n, s in runs)))


def _hf_rollout(spec: dict[str, Any], prompts: list[list[int]]) -> Any:
    """The TRL-without-vLLM way: HF `generate` on the left-padded batch of every sample."""
    import torch

    import serve_hf
    from astrai_train.tokenizer import Tokenizer

    model = serve_hf.load_model(spec["hf_dir"], spec["device"], spec["rollout_dtype"])
    stop = sorted(Tokenizer.from_pretrained(spec["model_dir"]).stop_ids)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(batch: list[list[int]], seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        rows = [p for p in batch for _ in range(spec["group_size"])]
        width = max(len(p) for p in rows)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=spec["device"])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=spec["device"])
        with torch.no_grad():
            outs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["rollout_tokens"],
                                  eos_token_id=stop, pad_token_id=pad, **serve_hf.sampling(spec["temperature"]))
        completions = []
        for row in outs[:, width:].tolist():  # up to and including the first stop token
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            completions.append(row[:end])
        return completions
    return run
