"""GRPO rollouts: G sampled completions per prompt, from the policy being trained.

Two samplers behind one call:
  engine    astrai_serve's continuous-batching engine, in-process, over the very nn.Module being
            trained (no weight copy: it reads the live parameters; its prefix cache is dropped
            after every optimizer step because cached K/V belong to the old weights)
  generate  the model's own batched loop with a contiguous KV cache (astrai_train.model.generate)
Sampling is seeded per (run seed, step, rank), not from the global RNG, so a resumed run draws
exactly the completions the uninterrupted run drew.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from astrai_train.model import generate


def rollout_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """A 63-bit seed unique to this draw; stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def engine_available() -> bool:
    try:
        from astrai_serve import LLM  # noqa: F401
    except ImportError:
        return False
    return hasattr(LLM, "from_model")


class RolloutSampler:
    """`sample(prompts, seed) -> completions`: group_size lists of token ids per prompt, grouped
    prompt after prompt ([p0 g0, p0 g1, ..., p1 g0, ...])."""

    def __init__(self, model: nn.Module, tokenizer: Any, group_size: int, max_new_tokens: int,
                 temperature: float, backend: str = "auto", engine_args: dict[str, Any] | None = None) -> None:
        if backend == "auto":
            backend = "engine" if engine_available() else "generate"
        if backend == "engine" and not engine_available():
            raise ValueError("grpo.rollout=engine needs astrai_serve.LLM.from_model, which is not installed; "
                             "use grpo.rollout=generate")
        self.backend = backend
        self.model = model
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.engine_args = dict(engine_args or {})
        self._llm: Any = None
        self._pages = 0                      # KV pages of the engine built for the largest batch so far
        self.stop_ids = set(tokenizer.stop_ids)

    def _engine(self, n_seqs: int, longest_prompt: int) -> Any:
        args = dict(self.engine_args)
        sized = not {"num_pages", "kv_cache_memory_bytes", "gpu_memory_utilization"} & set(args)
        need = 0
        if sized:
            # The engine's default takes most free GPU memory for its KV cache; training needs
            # that memory. Size the cache for this rollout batch, twice over (prompts vary), and
            # build a bigger engine when a batch outgrows it: too few pages would not fail, but
            # every step would preempt and recompute.
            page = int(args.get("page_size", 16))
            need = n_seqs * -(-(longest_prompt + self.max_new_tokens) // page) + 8
        if self._llm is None or need > self._pages:
            from astrai_serve import LLM

            self._llm = None                     # free the old cache before the new one is made
            if sized:
                args["num_pages"] = self._pages = 2 * need
            args.setdefault("max_num_seqs", n_seqs)
            self._llm = LLM.from_model(self.model, self.tokenizer, **args)
        return self._llm

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        was_training = self.model.training
        self.model.eval()
        try:
            if self.backend == "engine":
                return self._sample_engine(prompts, seed)
            return self._sample_generate(prompts, seed)
        finally:
            self.model.train(was_training)

    def _sample_generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        repeated = [p for p in prompts for _ in range(self.group_size)]
        return generate(self.model, repeated, self.max_new_tokens, eos_ids=self.stop_ids,
                        temperature=self.temperature, generator=generator)

    def _sample_engine(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from astrai_serve import SamplingParams

        params = [SamplingParams(n=self.group_size, temperature=self.temperature, max_tokens=self.max_new_tokens,
                                 seed=(seed + i) % (1 << 62), stop_token_ids=tuple(sorted(self.stop_ids)),
                                 detokenize=False)  # rewards decode whole completions themselves
                  for i in range(len(prompts))]
        llm = self._engine(len(prompts) * self.group_size, max(len(p) for p in prompts))
        outputs = llm.generate(prompts, params)
        completions: list[list[int]] = []
        for out in outputs:
            samples = out.outputs
            if len(samples) != self.group_size:
                raise RuntimeError(f"the engine returned {len(samples)} samples for n={self.group_size}")
            completions.extend(list(s.token_ids) for s in samples)
        return completions

    def weights_changed(self) -> None:
        """After an optimizer step: cached prefixes hold K/V of the old weights."""
        if self._llm is not None:
            self._llm.engine.reset_prefix_cache()
