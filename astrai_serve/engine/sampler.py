"""Sampler: logits of a batch -> next tokens (+ log-probs), vectorized on the device.

Order per row: the grammar mask of a row under structured output (its disallowed tokens set to
-inf: structured/bitmask.py) -> logit_bias (added to the listed tokens' logits; first, as vLLM applies it) and
banned tokens (the stop tokens of a row below its min_tokens, set to -inf; one scatter with the
bias) -> penalties (repetition on prompt+output tokens; presence and frequency on output tokens, as OpenAI
defines them) -> greedy argmax when temperature is 0 -> otherwise temperature, top-k, top-p and
min-p (one sort for all three) -> a draw. Greedy and sampled rows share the batch.

The draw is the Gumbel-max trick with hashed noise (kernels/gumbel.py): argmax(x / T + G) picks
token i with probability softmax(x / T)_i, in ONE pass over the logits (one Triton kernel on the
GPU). A row's noise is a hash of its key: for a seeded sample a hash of (seed, position sampled),
so the same seed gives the same tokens whatever else is in the batch, with no per-request
generator and no per-row launch; rows without a seed take keys from the sampler's own stream.

Log-probs are those of the model's distribution (log_softmax of the raw logits, before
logit_bias, penalties and temperature), as vLLM reports them by default (its raw_logprobs); under
a grammar, of that distribution over the tokens the grammar allows (vLLM masks before it too).

No host sync but one: `sample_async` only enqueues device work, ending in ONE non-blocking copy
of the sampled ids (and the log-probs, packed into the same transfer) into pinned memory;
`PendingSample.result()` waits for that copy alone (a CUDA event) and reads it. Everything the
host sends (temperatures, penalties, ...) goes through pinned memory too.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from astrai_serve.kernels import gumbel_argmax
from astrai_serve.kernels.gumbel import seeded_keys, split_keys

from .penalty_counts import PenaltyCounts
from .sampling_params import SamplingParams
from .structured.bitmask import DeviceMask, apply_bitmask
from .transfer import HostCopy, to_device

Logprob = tuple[int, float, list[tuple[int, float]]]  # (token, logprob, [(top token, logprob), ...])


@dataclass
class SampleResult:
    token_ids: list[int]                 # one per row
    logprobs: list[Logprob | None]       # one per row; None where the request did not ask


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._rng = np.random.Generator(np.random.PCG64(seed))   # keys of rows without a seed
        self._counts: PenaltyCounts | None = None                 # made at the first keyed penalty

    @torch.inference_mode()
    def warm_up(self, vocab: int, dtype: torch.dtype) -> None:
        """Draw once from uniform logits of the model's dtype and of float32 (what penalties and
        top-k/top-p filters hand on), so the sampling kernels JIT-compile at startup rather than
        in the first sampled step a server takes (about a second on an H200)."""
        ones = torch.ones(1, dtype=torch.float32, device=self.device)
        keys = torch.zeros(1, 2, dtype=torch.int64, device=self.device)
        for dt in dict.fromkeys((dtype, torch.float32)):
            gumbel_argmax(torch.zeros(1, vocab, dtype=dt, device=self.device), ones, keys)

    def release(self, key: int) -> None:
        """Forget the penalty counts kept for `key` (its sequence finished)."""
        if self._counts is not None:
            self._counts.release(key)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None] | None = None,
                 positions: list[int] | None = None, histories: list[tuple[list[int], int]] | None = None,
                 history_keys: list[int] | None = None,
                 banned: list[Collection[int] | None] | None = None,
                 grammar: DeviceMask | None = None) -> SampleResult:
        """logits [S, V] (float32, or bf16/fp16 as the model makes them: the draw and argmax
        read them as they are, log-probs and penalties widen to float32 first); per row: its
        params, its sample's seed (or None), the position it samples (the sequence's length;
        with a seed it picks the noise) and (token_ids,
        num_prompt_tokens) for the penalties (needed only when a row has some). With
        history_keys (one stable key per row, e.g. the sequence id) the penalty counts are
        kept on the device and advanced by each step's new tokens (release a key when its
        sequence ends); without, they are rebuilt from the histories. banned: per row, token
        ids it must not sample this step (None = none), e.g. its stop tokens below min_tokens.
        grammar: the token bitmasks of the rows under structured output (the others untouched)."""
        return self.sample_async(logits, params, seeds, positions, histories, history_keys, banned,
                                 grammar).result()

    @torch.inference_mode()
    def sample_async(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None] | None = None,
                     positions: list[int] | None = None, histories: list[tuple[list[int], int]] | None = None,
                     history_keys: list[int] | None = None,
                     banned: list[Collection[int] | None] | None = None,
                     grammar: DeviceMask | None = None) -> "PendingSample":
        """Enqueue the sampling of every row; the result comes with `.result()`."""
        if grammar is not None:
            logits = apply_bitmask(logits, grammar)      # a copy: the runner's logits stay as they are
        want_lp = any(p.logprobs for p in params)
        raw_logprobs = logits.float().log_softmax(-1) if want_lp else None
        edits = (self._edits(params, banned, logits.shape[1])
                 if banned or any(p.logit_bias for p in params) else None)
        if edits:
            logits = self._edit(logits, edits)
        if any(p.uses_penalties for p in params):
            if histories is None:
                raise ValueError("rows with penalties need their token histories")
            logits = self._penalize(logits, params, histories, history_keys, copy=not edits)
        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
        else:
            tokens = self._draw(logits, params, self._keys(len(params), seeds, positions))
        return self._to_host(tokens, raw_logprobs, params)

    def _keys(self, n: int, seeds: list[int | None] | None, positions: list[int] | None) -> np.ndarray:
        """uint64 noise key per row: the sampler's stream, or a hash of (seed, position)."""
        keys = self._rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
        rows = [i for i, s in enumerate(seeds or ()) if s is not None]
        if rows:
            if positions is None:
                raise ValueError("seeded rows need the positions they sample")
            keys[rows] = seeded_keys(np.array([seeds[i] for i in rows], dtype=np.uint64),
                                     np.array([positions[i] for i in rows], dtype=np.uint64))
        return keys

    @staticmethod
    def _edits(params: list[SamplingParams], banned: list[Collection[int] | None] | None, vocab: int
               ) -> list[tuple[int, int, float]]:
        """(row, token, value to add) for every logit_bias entry and every banned token (-inf:
        added to anything, a bias included, it stays -inf). A banned id past the vocabulary (a
        stop_token_ids entry may be) can never be drawn anyway: left out, not indexed."""
        pairs = [(i, t, b) for i, p in enumerate(params) if p.logit_bias for t, b in p.logit_bias.items()]
        if banned:
            pairs += [(i, t, -math.inf) for i, ids in enumerate(banned) if ids for t in ids if t < vocab]
        return pairs

    @staticmethod
    def _edit(logits: torch.Tensor, pairs: list[tuple[int, int, float]]) -> torch.Tensor:
        """A float32 copy of the logits with `pairs` added: one scatter over the (row, token)
        pairs of the rows that have any, built on the host, no sync."""
        rows, cols, vals = zip(*pairs)
        dev = logits.device
        idx = to_device([rows, cols], torch.int64, dev)
        logits = logits.to(torch.float32, copy=True)    # never write into the runner's logits
        logits.index_put_((idx[0], idx[1]), to_device(vals, torch.float32, dev), accumulate=True)
        return logits

    def _penalize(self, logits: torch.Tensor, params: list[SamplingParams],
                  histories: list[tuple[list[int], int]], keys: list[int] | None,
                  copy: bool = True) -> torch.Tensor:
        rows = [i for i, p in enumerate(params) if p.uses_penalties]
        n, vocab, dev = len(rows), logits.shape[1], logits.device

        if keys is None:        # nothing to keep between calls: counts for this call alone
            counts, keys = PenaltyCounts(vocab, dev, capacity=n), list(range(len(params)))
        else:
            if self._counts is None:
                self._counts = PenaltyCounts(vocab, dev)
            counts = self._counts
        outputs, in_prompt = counts.gather([keys[i] for i in rows], [histories[i] for i in rows])
        rep, freq, pres = to_device([[params[i].repetition_penalty, params[i].frequency_penalty,
                                      params[i].presence_penalty] for i in rows], torch.float32, dev).T[:, :, None]
        idx = to_device(rows, torch.int64, dev)
        sub = logits[idx].float()
        seen = (outputs > 0) | in_prompt
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * outputs - pres * (outputs > 0)
        logits = logits.to(torch.float32, copy=copy)    # one copy, widened (bf16) or not (_edit made one)
        logits[idx] = sub
        return logits

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams], keys: np.ndarray) -> torch.Tensor:
        dev = logits.device
        keys_t = to_device(split_keys(keys), torch.int64, dev)
        temps = [p.temperature for p in params]           # 0 = greedy: argmax, no noise
        if not any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params):
            return gumbel_argmax(logits, to_device(temps, torch.float32, dev), keys_t)
        # Filters act on the tempered distribution: divide first, then draw at temperature 1.
        scale, unit = to_device([[t if t > 0 else 1.0 for t in temps], [1.0 if t > 0 else 0.0 for t in temps]],
                                torch.float32, dev)
        tokens = gumbel_argmax(self._filter(logits / scale[:, None], params), unit, keys_t)
        if any(p.greedy for p in params):   # greedy rows: the raw argmax, whatever their filters
            tokens = torch.where(unit > 0, tokens, logits.argmax(-1))
        return tokens

    @staticmethod
    def _filter(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        dev, vocab = x.device, x.shape[1]
        k, top_p, min_p = to_device([[float(min(p.top_k, vocab) if p.top_k else vocab), p.top_p, p.min_p]
                                     for p in params], torch.float32, dev).T[:, :, None]
        sorted_x, order = x.sort(-1, descending=True)
        drop = torch.arange(vocab, device=dev)[None, :] >= k
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        probs = sorted_x.softmax(-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p          # the mass before it already reached top_p
        drop |= probs < min_p * probs[:, :1]
        drop[:, 0] = False                                   # always keep the most likely token
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, order, sorted_x)

    @staticmethod
    def _to_host(tokens: torch.Tensor, raw_logprobs: torch.Tensor | None,
                 params: list[SamplingParams]) -> "PendingSample":
        top = 0
        if raw_logprobs is None:
            packed = tokens
        else:
            top = max(p.top_logprobs for p in params)
            parts = [tokens.double(), raw_logprobs.gather(1, tokens[:, None])[:, 0].double()]
            if top:
                top_v, top_i = raw_logprobs.topk(top, dim=-1)
                parts += [top_i.double().flatten(), top_v.double().flatten()]
            packed = torch.cat(parts)      # one transfer for ids and log-probs
        return PendingSample(packed, tokens, top, params, raw_logprobs is not None)


class PendingSample:
    """Sampled ids on their way to the host: one non-blocking copy into pinned memory, then an
    event. `result()` waits for that event only: the step's single host synchronisation.
    `tokens` stays on the device: the next decode step can be fed from it before the copy lands
    (the engine's async scheduling)."""

    def __init__(self, packed: torch.Tensor, tokens: torch.Tensor, top: int, params: list[SamplingParams],
                 logprobs: bool) -> None:
        self.tokens = tokens
        self._n, self._top, self._params, self._logprobs = tokens.shape[0], top, params, logprobs
        self._copy = HostCopy(packed)

    def result(self) -> SampleResult:
        host = self._copy.tolist()
        n, top, params = self._n, self._top, self._params
        if not self._logprobs:
            return SampleResult(host, [None] * n)
        ids = [int(t) for t in host[:n]]
        chosen = host[n:2 * n]
        out: list[Logprob | None] = []
        for i, p in enumerate(params):
            if not p.logprobs:
                out.append(None)
                continue
            alts = []
            if p.top_logprobs:
                base_i, base_v = 2 * n + i * top, 2 * n + n * top + i * top
                alts = [(int(host[base_i + j]), host[base_v + j]) for j in range(p.top_logprobs)]
            out.append((ids[i], chosen[i], alts))
        return SampleResult(ids, out)
