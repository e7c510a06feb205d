"""Sequence: the scheduler's view of one sample of one request.

A request with n samples becomes n sequences (index 0..n-1) over the same prompt. The state is
deliberately small and explicit:

- `token_ids`: prompt followed by everything generated so far.
- `num_computed`: how many of those tokens have their K/V in the cache. The next step feeds
  `token_ids[num_computed:num_computed + q]`; when that reaches the end, the step's last logits
  produce the next token. A decode is simply the case of one token left to compute. The newest
  token never has K/V yet (it was just sampled), so a running sequence always has >= 1 left.
- `page_table`: the KV pages holding token t at `page_table[t // page_size]`, slot
  `t % page_size`. Preemption drops the pages and resets num_computed: the sequence is
  recomputed later from its tokens (prompt + output so far), so nothing generated is lost.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued (new or preempted), holds no pages
    RUNNING = "running"      # admitted: holds pages, gets tokens computed each step
    FINISHED = "finished"    # done or aborted, pages released


@dataclass(eq=False)
class Sequence:
    seq_id: int                                 # engine-unique, stable for the life of the sample
    request_id: str                             # the user's id, shared by the n samples
    index: int                                  # sample index within the request (0..n-1)
    token_ids: list[int]                        # prompt + generated tokens
    num_prompt_tokens: int                      # length of the prompt part of token_ids
    params: SamplingParams                      # how to sample and when to stop
    arrival: int = 0                            # admission order key (lower = older)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0                       # tokens whose K/V are in the cache
    page_table: list[int] = field(default_factory=list)
    cache_node: Any = None                      # radix node locked by this sequence (or None)
    cached_tokens: int = 0                      # prompt tokens served by the prefix cache at first admission
    ever_admitted: bool = False                 # cached_tokens is fixed at the first admission
    published: bool = False                     # prompt pages offered to the prefix cache since admission
    score_prompt: bool = False                  # prompt log-probs still to compute: take no cached prefix (it has no hidden states)
    share_from: "Sequence | None" = None        # sample 0 of the request, whose prompt pages siblings share
    pending_siblings: list["Sequence"] = field(default_factory=list)  # samples 1..n-1 waiting for our prefill
    finish_reason: str | None = None            # "stop" | "length" | "abort" once finished
    stream: bool = True                         # an output every step (False: one, when finished)
    state: Any = None                           # engine-side per-sample state (detokenizer, RNG, ...)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_to_compute(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_prefill(self) -> bool:
        """More than one token to compute: a (possibly chunked) prefill or a recompute."""
        return self.num_to_compute > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
