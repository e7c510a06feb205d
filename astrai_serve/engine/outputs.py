"""Per-sample output state: incremental text, stop conditions, and the RequestOutput deltas.

Stop rules, checked after every new token:
- an eos / end-of-turn token (unless ignore_eos) or one of stop_token_ids -> "stop"; the token
  is in token_ids but adds no text;
- a stop string in the text -> "stop"; the text is cut before it (the stop string is not
  returned, as OpenAI does). While stop strings are set, the last len(longest)-1 characters
  are held back from the deltas, so a stop string split across tokens never leaks out;
- max_tokens generated, or the context full -> "length".
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from astrai_train.tokenizer import IncrementalDetokenizer

from .sampler import Logprob
from .sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    index: int                          # sample index (0..n-1)
    new_token_ids: list[int]            # tokens generated this step
    new_text: str                       # text delta this step
    token_ids: list[int]                # all generated tokens so far
    text: str                           # all text so far (final text once finished)
    finished: bool
    finish_reason: str | None           # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int                  # prompt tokens served from the prefix cache
    logprobs: list[Logprob] | None = None  # per new token: (id, logprob, [(top id, logprob), ...])


@dataclass
class SampleState:
    """Engine-side state of one sample (kept in Sequence.state)."""

    stop_ids: frozenset[int]                        # token ids that end the sample
    generator: torch.Generator | None               # per-request RNG when a seed is given
    detok: IncrementalDetokenizer | None            # None when the engine has no tokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    holdback: int = 0                               # chars held back while stop strings may complete


def new_state(seq: Sequence, tokenizer, generator: torch.Generator | None) -> SampleState:
    p = seq.params
    stop_ids = set(p.stop_token_ids)
    if tokenizer is not None and not p.ignore_eos:
        stop_ids |= set(tokenizer.stop_ids)
    detok = None
    if tokenizer is not None:
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens)
    holdback = max((len(s) for s in p.stop), default=1) - 1
    return SampleState(frozenset(stop_ids), generator, detok, holdback=holdback)


def check_stop(seq: Sequence, max_seq_len: int) -> str | None:
    """Advance seq's text by its newest token; return a finish reason if it is done."""
    st: SampleState = seq.state
    p, token = seq.params, seq.token_ids[-1]
    if token in st.stop_ids:
        reason = "stop"
    else:
        reason = None
        if st.detok is not None:
            before = len(st.text)
            st.text += st.detok.push([token])
            if p.stop and _cut_at_stop(st, p.stop, before):
                return "stop"
    if reason is None and (seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= max_seq_len):
        reason = "length"
    if reason is not None and st.detok is not None:
        before = len(st.text)
        st.text += st.detok.flush()
        if p.stop:
            _cut_at_stop(st, p.stop, before)
    return reason


def _cut_at_stop(st: SampleState, stops: tuple[str, ...], before: int) -> bool:
    # Only a match that ends in the new text can be new: start the search just before it.
    start = max(0, before - max(len(s) for s in stops) + 1)
    hits = [i for i in (st.text.find(s, start) for s in stops) if i >= 0]
    if not hits:
        return False
    st.text = st.text[:min(hits)]
    return True


def make_output(seq: Sequence, finished: bool) -> RequestOutput:
    """The delta since the last output of this sample (and the totals)."""
    st: SampleState = seq.state
    completion = seq.completion_ids
    visible = len(st.text) if finished else max(st.emitted_chars, len(st.text) - st.holdback)
    new_text = st.text[st.emitted_chars:visible]
    new_ids = completion[st.emitted_tokens:]
    new_lp = st.logprobs[st.emitted_tokens:] if seq.params.logprobs else None
    st.emitted_chars, st.emitted_tokens = visible, len(completion)
    return RequestOutput(
        request_id=seq.request_id, index=seq.index, new_token_ids=new_ids, new_text=new_text,
        token_ids=list(completion), text=st.text[:visible], finished=finished,
        finish_reason=seq.finish_reason if finished else None, prompt_tokens=seq.num_prompt_tokens,
        completion_tokens=len(completion), cached_tokens=seq.cached_tokens, logprobs=new_lp)
