"""Batched generation with the contiguous KV cache: prefill every prompt in one flat step, then
decode one token per live sequence per step. The serving engine is the fast path; this one is
for training-time sampling, evaluation and as a reference in tests."""
from __future__ import annotations

import torch

from .kv_cache import ContiguousKVCache


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int] | None = None,
             temperature: float = 0.0, top_k: int | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Generated token ids per prompt (an eos token, when produced, is the last one)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    eos_ids = set(eos_ids or ())
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    longest = max(len(p) for p in prompts)
    cache_len = min(longest + max_new_tokens, model.config.max_len)
    if longest > cache_len or longest >= model.config.max_len and max_new_tokens:
        raise ValueError(f"prompt of {longest} tokens leaves no room within max_len={model.config.max_len}")
    cache = ContiguousKVCache(model.config, len(prompts), cache_len, device=device, dtype=dtype)

    outputs: list[list[int]] = [[] for _ in prompts]
    lengths = [len(p) for p in prompts]
    live = list(range(len(prompts)))
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    seq_ids = torch.tensor([i for i, p in enumerate(prompts) for _ in p], device=device)
    positions = torch.tensor([j for p in prompts for j in range(len(p))], device=device)
    last_rows = torch.tensor(lengths, device=device).cumsum(0) - 1
    for _ in range(max_new_tokens):
        hidden = model.forward_flat(ids, positions, cache.step(seq_ids, positions))
        logits = model.compute_logits(hidden[last_rows]).float()
        next_ids = _sample(logits, temperature, top_k, generator).tolist()
        still = []
        for row, seq in enumerate(live):
            tok = next_ids[row]
            outputs[seq].append(tok)
            lengths[seq] += 1
            if tok not in eos_ids and lengths[seq] < cache_len:
                still.append((seq, tok))
        if not still:
            break
        live = [s for s, _ in still]
        ids = torch.tensor([t for _, t in still], device=device)
        seq_ids = torch.tensor(live, device=device)
        positions = torch.tensor([lengths[s] - 1 for s in live], device=device)
        last_rows = torch.arange(len(live), device=device)
    return outputs


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
