"""SamplingParams: how one request turns logits into tokens, and when it stops.

Validated once, when built, so a bad value fails at the API boundary with a message naming the
field instead of surfacing later as a NaN or an index error inside a batched step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .structured_spec import StructuredOutput

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; also bounds the per-step top-k over the vocabulary
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 effectively bans a token, +100 effectively forces it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16                  # most tokens to generate per sample ("length" when reached); 0 = score the prompt only
    min_tokens: int = 0                   # fewest tokens to generate: until then stop tokens are masked and stop strings ignored
    temperature: float = 1.0              # 0 = greedy (argmax); > 0 divides the logits
    top_p: float = 1.0                    # nucleus: keep the smallest set of tokens with mass >= top_p
    top_k: int = 0                        # keep the k most likely tokens; 0 (or -1) = all
    min_p: float = 0.0                    # drop tokens with prob < min_p * max prob
    presence_penalty: float = 0.0         # subtract once from tokens already generated (OpenAI)
    frequency_penalty: float = 0.0        # subtract per occurrence in the generated tokens (OpenAI)
    repetition_penalty: float = 1.0       # divide (>0 logits) / multiply (<0) for prompt+output tokens
    seed: int | None = None               # per-request RNG: same seed -> same tokens, whatever the batch
    stop: tuple[str, ...] = ()            # stop strings; the text is cut before the first one
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the sample
    ignore_eos: bool = False              # keep going past the tokenizer's eos/end-of-turn tokens
    n: int = 1                            # independent samples of the same prompt (share its KV pages)
    logprobs: bool = False                # return the log-prob of every generated token
    top_logprobs: int = 0                 # with logprobs: also the this-many most likely alternatives
    prompt_logprobs: int | None = None    # k: the log-prob of every prompt token given its prefix, and its k most likely alternatives; None = off
    skip_special_tokens: bool = True      # leave special tokens out of the returned text
    detokenize: bool = True               # False: token ids only, no text (saves the host time, e.g. GRPO rollouts)
    structured: StructuredOutput | None = None  # the output must match a JSON Schema / regex / choice / grammar / tool call (structured_spec.py)
    # Out of the hash: a dict is unhashable. Ids past the vocabulary are refused by the engine, which knows it.
    logit_bias: dict[int, float] | None = field(default=None, hash=False)  # token id -> bias in [-100, 100] added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.structured, dict):   # from_dict / JSON: the spec's own fields
            object.__setattr__(self, "structured", StructuredOutput(**self.structured))
        # Accept a single string / list for the tuple fields, as OpenAI clients send either.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if isinstance(self.logit_bias, dict):   # a copy (the caller's dict may change later); {} = off
            object.__setattr__(self, "logit_bias", dict(self.logit_bias) or None)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 0:
            raise bad("max_tokens", "must be an integer >= 0 (0: only score the prompt, see prompt_logprobs)")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens})")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if not is_num(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 or -1 = no limit)")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 = off)")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [0, 2**63) or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if not is_int(self.n) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if not isinstance(self.logprobs, bool):
            raise bad("logprobs", "must be true or false")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS):
            raise bad("prompt_logprobs", f"must be None (off) or an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not isinstance(self.detokenize, bool):
            raise bad("detokenize", "must be true or false")
        if self.stop and not self.detokenize:
            raise bad("stop", "stop strings need the text: set detokenize=True or use stop_token_ids")
        if self.top_logprobs and not self.logprobs:
            raise bad("top_logprobs", "needs logprobs=True")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise bad("structured", "must be a StructuredOutput or None")
        if self.structured is not None and self.ignore_eos:
            # The grammar decides where a structured output ends (and allows eos only there).
            raise bad("ignore_eos", "cannot be combined with structured output: the grammar decides where it ends")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict of token id -> bias, or None")
            for t, b in self.logit_bias.items():   # name the one bad entry, not the whole (long) dict
                if not is_int(t) or t < 0:
                    raise ValueError(f"invalid sampling parameter logit_bias={{{t!r}: {b!r}}}: "
                                     "token ids must be integers >= 0")
                if not is_num(b) or abs(b) > MAX_LOGIT_BIAS:
                    raise ValueError(f"invalid sampling parameter logit_bias={{{t!r}: {b!r}}}: "
                                     f"biases must be finite numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        """Build from a plain dict, rejecting unknown keys with a message that names the key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter {unknown[0]!r} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**data)
