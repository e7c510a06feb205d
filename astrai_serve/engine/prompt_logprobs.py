"""Prompt log-probs: the log-prob of every prompt token given the tokens before it, and its k most
likely alternatives, for requests that set SamplingParams.prompt_logprobs (scoring; lm-eval's
loglikelihood tasks reach it through the completions API's echo + logprobs).

Where: in the prefill. The hidden state at position p predicts token p + 1, so the rows of a chunk
at positions [start, min(end, L - 1)) of a sequence whose prompt has L tokens score prompt tokens
start + 1 onwards; the row at L - 1 is the sampler's. The model runner hands back those rows'
hidden states (its `taps`), and `score` turns them into log-probs on the device:
- only the rows of sequences that asked: a batch where nobody did runs none of this (the engine
  tests one empty set before it looks at the plan), so decode steps and their CUDA graphs are
  untouched;
- through the LM head in chunks of rows, so a long prompt never holds [tokens, vocab] floats at
  once (16k tokens of qwen3's 151,936-token vocabulary would be 10 GB in float32);
- from the raw logits, log-softmax in float32: the model's distribution, before temperature,
  penalties and logit_bias, as the sampler reports the generated tokens' log-probs.
The values go to the host in one non-blocking copy per step, enqueued before the step's sampling,
so the step's single host sync (the sampled ids) also covers them; they are read when the
sequence's first output is built.

Chunked prefill: each step scores its own chunk's rows and `PromptScores` puts the parts together
by position. Prefix cache: cached tokens have no hidden states, so a sequence still scoring its
prompt takes no cached prefix (KVCacheManager.match reads `Sequence.score_prompt`) but publishes
its pages as any other. A sequence preempted while still scoring recomputes from its first token
and scores again; the later part overwrites the earlier.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .sampler import Logprob
from .scheduler import ScheduledChunk
from .sequence import Sequence
from .transfer import HostCopy, to_device

# Logits per LM-head chunk: 32M floats (128 MB in float32, the log-softmax's own output) is ~220
# rows of qwen3's vocabulary, about what the sampler holds for a decode step of 256 sequences.
MAX_CHUNK_ELEMENTS = 1 << 25


class PromptSpan(NamedTuple):
    seq: Sequence
    first: int     # first position scored: its hidden state predicts token first + 1
    count: int     # positions scored this step
    row: int       # the flat batch row (the runner's layout) of position `first`


def spans_of(chunks: list[ScheduledChunk], scoring: set[Sequence]) -> list[PromptSpan]:
    """The prompt positions this step computes for sequences still scoring their prompt."""
    spans, row = [], 0
    for c in chunks:
        seq = c.seq
        if seq in scoring:
            end = min(c.start + c.num_tokens, seq.num_prompt_tokens - 1)
            if end > c.start:
                spans.append(PromptSpan(seq, c.start, end - c.start, row))
        row += c.num_tokens
    return spans


def tap_rows(spans: list[PromptSpan]) -> np.ndarray:
    """The batch rows whose hidden states `score` needs, in span order."""
    return np.concatenate([np.arange(s.row, s.row + s.count, dtype=np.int64) for s in spans])


@torch.inference_mode()
def score(model: torch.nn.Module, hidden: torch.Tensor, spans: list[PromptSpan],
          max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> "PendingScores":
    """Enqueue the log-probs of the spans' next tokens from their hidden states [rows, dim]
    (`tap_rows` order); nothing waits here."""
    dev = hidden.device
    targets = []
    for s in spans:
        targets += s.seq.token_ids[s.first + 1:s.first + 1 + s.count]
    target = to_device(targets, torch.int64, dev)
    vocab = model.lm_weight.shape[0]
    k = min(max(s.seq.params.prompt_logprobs for s in spans), vocab)
    step = max(1, max_chunk_elements // vocab)
    chosen, top_i, top_v = [], [], []
    for a in range(0, hidden.shape[0], step):
        lp = model.compute_logits(hidden[a:a + step]).log_softmax(-1, dtype=torch.float32)
        chosen.append(lp.gather(1, target[a:a + step, None])[:, 0])
        if k:
            v, i = lp.topk(k, dim=-1)
            top_v.append(v)
            top_i.append(i)
        del lp              # free this chunk's logits before the next one's
    parts = [torch.cat(chosen).double()]
    if k:                   # ids as doubles (exact below 2**53): one transfer for everything
        parts += [torch.cat(top_i).double().flatten(), torch.cat(top_v).double().flatten()]
    return PendingScores(torch.cat(parts), targets, [s.count for s in spans],
                         [s.seq.params.prompt_logprobs for s in spans], k)


class PendingScores:
    """One step's prompt log-probs on their way to the host (a non-blocking copy, then an event)."""

    def __init__(self, packed: torch.Tensor, targets: list[int], counts: list[int], ks: list[int], k: int) -> None:
        self._targets, self._counts, self._ks, self._k = targets, counts, ks, k
        self._copy = HostCopy(packed)
        self._spans: list[list[Logprob]] | None = None

    def result(self) -> list[list[Logprob]]:
        """Per span, one (token, logprob, [(top token, logprob), ...]) per scored position."""
        if self._spans is None:
            host = self._copy.tolist()   # normally landed: the step's sampled ids came after it
            n, k = len(self._targets), self._k
            ids, vals = host[n:n + n * k], host[n + n * k:]
            out, row = [], 0
            for count, want in zip(self._counts, self._ks):
                span = []
                for r in range(row, row + count):
                    base = r * k
                    span.append((self._targets[r], host[r],
                                 [(int(ids[base + j]), vals[base + j]) for j in range(want)]))
                out.append(span)
                row += count
            self._spans = out
        return self._spans


class PromptScores:
    """One request's prompt log-probs, assembled from the steps that computed them; its n samples
    share it (sample 0 computes the prompt, the others reuse its pages)."""

    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self._parts: list[tuple[int, PendingScores, int]] = []   # (first position, step's scores, span index)
        self._done: list[Logprob | None] | None = None

    def add(self, first: int, pending: PendingScores, index: int) -> None:
        self._parts.append((first, pending, index))

    def result(self) -> list[Logprob | None]:
        """One entry per prompt token; the first is None (no token precedes it)."""
        if self._done is None:
            out: list[Logprob | None] = [None] * self.num_prompt_tokens
            for first, pending, index in self._parts:   # in step order: a rescore overwrites
                span = pending.result()[index]
                out[first + 1:first + 1 + len(span)] = span
            self._done, self._parts = out, []
        return self._done
