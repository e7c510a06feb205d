"""Per-sample output state: incremental text, stop conditions, and the RequestOutput deltas.

Stop rules, checked after every new token:
- an eos / end-of-turn token (unless ignore_eos) or one of stop_token_ids -> "stop"; the token
  is in token_ids but adds no text;
- a stop string in the text -> "stop"; the text is cut before it (the stop string is not
  returned, as OpenAI does). While stop strings are set, the last len(longest)-1 characters
  are held back from the deltas, so a stop string split across tokens never leaks out;
- max_tokens generated, or the context full -> "length". With max_tokens=0 a sample ends as
  soon as its prompt is computed, with nothing generated ("length");
- under structured output, a token after which the grammar admits nothing more -> "stop"; that
  token is text (a closing brace, say), so it stays in the text, unlike an eos.

Below min_tokens generated tokens the sampler never draws a stop token (the engine bans them),
and stop strings are not looked for (as vLLM: a stop string that ends before then never stops
the sample, since only matches ending in the new text are searched).

A request with prompt_logprobs gets them once per sample, in that sample's first output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from astrai_train.tokenizer import IncrementalDetokenizer
from astrai_train.tokenizer.detokenizer import push_many

from .prompt_logprobs import PromptScores
from .sampler import Logprob
from .sequence import Sequence


@dataclass
class RequestOutput:
    request_id: str
    index: int                          # sample index (0..n-1)
    new_token_ids: list[int]            # tokens generated this step
    new_text: str                       # text delta this step
    text: str                           # all text so far (final text once finished)
    finished: bool
    finish_reason: str | None           # "stop" | "length" | "abort" | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int                  # prompt tokens served from the prefix cache
    logprobs: list[Logprob] | None = None  # per new token: (id, logprob, [(top id, logprob), ...])
    # With prompt_logprobs, in the sample's first output: one per prompt token, the first None.
    prompt_logprobs: list[Logprob | None] | None = None
    # Set when the request failed inside the engine after add_request accepted it (a grammar that
    # turned out not to compile): finished, finish_reason "abort", no tokens. A client mistake,
    # worded as add_request's ValueError would have been.
    error: str | None = None
    # The sequence's token list (prompt + output; it only ever grows): token_ids is cut from it on
    # demand, since copying every generated token into every step's output is O(length) a step.
    _all_ids: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def token_ids(self) -> list[int]:
        """All tokens generated up to this output (a new list on each access)."""
        return self._all_ids[self.prompt_tokens:self.prompt_tokens + self.completion_tokens]


@dataclass
class SampleState:
    """Engine-side state of one sample (kept in Sequence.state)."""

    stop_ids: frozenset[int]                        # token ids that end the sample
    seed: int | None                                # the sample's seed (its noise is a hash of seed and position)
    detok: IncrementalDetokenizer | None            # None when the engine has no tokenizer
    text: str = ""
    emitted_chars: int = 0
    emitted_tokens: int = 0
    logprobs: list[Logprob] = field(default_factory=list)
    holdback: int = 0                               # chars held back while stop strings may complete
    pushed_from: int = 0                            # len(text) before the last pushed token's text
    prompt_scores: PromptScores | None = None       # the request's prompt log-probs until this sample's first output
    grammar: Any = None                             # structured output: the sample's SequenceMatcher (structured/matcher.py)


def new_state(seq: Sequence, tokenizer, seed: int | None, prompt_scores: PromptScores | None = None) -> SampleState:
    p = seq.params
    stop_ids = set(p.stop_token_ids)
    if tokenizer is not None and not p.ignore_eos:
        stop_ids |= set(tokenizer.stop_ids)
    detok = None
    if tokenizer is not None and p.detokenize:
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens)
    holdback = max((len(s) for s in p.stop), default=1) - 1
    return SampleState(frozenset(stop_ids), seed, detok, holdback=holdback, prompt_scores=prompt_scores)


def check_stop(seq: Sequence, max_seq_len: int) -> str | None:
    """Advance seq's text by its newest token; return a finish reason if it is done."""
    st: SampleState = seq.state
    p, token = seq.params, seq.token_ids[-1]
    if not p.max_tokens:        # done once the prompt is in
        return "length"
    if token in st.stop_ids:
        reason = "stop"
    else:
        reason = None
        if st.detok is not None:
            before = len(st.text)
            st.text += st.detok.push([token])
            if p.stop and seq.num_completion_tokens >= p.min_tokens and _cut_at_stop(st, p.stop, before):
                return "stop"
    if reason is None and st.grammar is not None and st.grammar.done:
        reason = "stop"
    if reason is None and (seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= max_seq_len):
        reason = "length"
    if reason is not None and st.detok is not None:
        before = len(st.text)
        st.text += st.detok.flush()
        if p.stop and seq.num_completion_tokens >= p.min_tokens:
            _cut_at_stop(st, p.stop, before)
    return reason


def check_stops(seqs: list[Sequence], max_seq_len: int) -> list[str | None]:
    """`[check_stop(s, max_seq_len) for s in seqs]`, with the new tokens of all sequences
    detokenized in batched calls (per-sequence calls dominate a large decode step)."""
    reasons, later = finish_reasons(seqs, max_seq_len)
    advance_text(seqs, reasons, later)
    return reasons


def finish_reasons(seqs: list[Sequence], max_seq_len: int) -> tuple[list[str | None], list[int]]:
    """Phase 1 of check_stops: every sequence's finish reason (or None).

    Only sequences with stop strings need their text for that, so only theirs is advanced here;
    the indices of the others come back as the second value, for `advance_text`, which the
    engine runs after launching the next step (their text cannot change their reason).
    """
    reasons: list[str | None] = [None] * len(seqs)
    later: list[int] = []
    now: list[int] = []
    for i, seq in enumerate(seqs):
        st, p = seq.state, seq.params
        if not p.max_tokens:        # max_tokens=0: done once the prompt is in, no token, no text
            reasons[i] = "length"
            continue
        if seq.token_ids[-1] in st.stop_ids or (st.grammar is not None and st.grammar.done):
            reasons[i] = "stop"
        elif seq.num_completion_tokens >= p.max_tokens or seq.num_tokens >= max_seq_len:
            reasons[i] = "length"
        if st.detok is not None:
            (now if p.stop else later).append(i)
    if now:
        pushing = [i for i in now if not _on_stop_token(seqs[i])]
        _push(seqs, pushing)
        for i in pushing:
            seq = seqs[i]
            if seq.num_completion_tokens < seq.params.min_tokens:
                continue
            if _cut_at_stop(seq.state, seq.params.stop, seq.state.pushed_from):
                reasons[i] = "stop"                # check_stop returns here: no flush
                now.remove(i)
        _flush(seqs, [i for i in now if reasons[i] is not None])
    return reasons, later


def advance_text(seqs: list[Sequence], reasons: list[str | None], later: list[int]) -> None:
    """Phase 2 of check_stops: the text of the sequences `finish_reasons` left for later.

    An unstreamed sample (stream=False: nobody reads it before it finishes) has no stop strings
    here, so its text is decoded once, when it finishes, instead of a push per step: at 256
    samples that push was the largest host phase of an offline decode step (1.4 ms of W2's ~6 ms
    on an H200). The detokenizer's contract (deltas + flush == decode of all ids) makes the two
    texts equal."""
    _push(seqs, [i for i in later if not _on_stop_token(seqs[i]) and seqs[i].stream])
    done = [i for i in later if reasons[i] is not None]
    _push_all(seqs, [i for i in done if not seqs[i].stream], reasons)
    _flush(seqs, done)


def _on_stop_token(seq: Sequence) -> bool:
    """Whether the newest token is a stop token (which adds no text), as opposed to a sample that
    stopped on a stop string or at the end of its grammar."""
    return seq.token_ids[-1] in seq.state.stop_ids


def _push(seqs: list[Sequence], which: list[int]) -> None:
    if not which:
        return
    deltas = push_many([seqs[i].state.detok for i in which], [[seqs[i].token_ids[-1]] for i in which])
    for i, delta in zip(which, deltas):
        st = seqs[i].state
        st.pushed_from = len(st.text)
        st.text += delta


def _push_all(seqs: list[Sequence], which: list[int], reasons: list[str | None]) -> None:
    """Push every completion token of these never-pushed samples at once (a stop token is not
    text, as in the per-step path)."""
    if not which:
        return
    ids = [seqs[i].token_ids[seqs[i].num_prompt_tokens:len(seqs[i].token_ids) - _on_stop_token(seqs[i])]
           for i in which]
    for i, delta in zip(which, push_many([seqs[i].state.detok for i in which], ids)):
        seqs[i].state.text += delta


def _flush(seqs: list[Sequence], which: list[int]) -> None:
    for i in which:
        seq = seqs[i]
        st, stops = seq.state, seq.params.stop
        before = len(st.text)
        st.text += st.detok.flush()
        if stops and seq.num_completion_tokens >= seq.params.min_tokens:
            _cut_at_stop(st, stops, before)


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
    ids, prompt = seq.token_ids, seq.num_prompt_tokens
    n_out = len(ids) - prompt
    text = st.text
    visible = len(text) if finished else max(st.emitted_chars, len(text) - st.holdback)
    new_text = text[st.emitted_chars:visible]
    new_ids = ids[prompt + st.emitted_tokens:]
    new_lp = st.logprobs[st.emitted_tokens:] if seq.params.logprobs else None
    st.emitted_chars, st.emitted_tokens = visible, n_out
    prompt_lp = None
    if st.prompt_scores is not None:        # this sample's first output: once, then let go
        prompt_lp, st.prompt_scores = st.prompt_scores.result(), None
    return RequestOutput(
        request_id=seq.request_id, index=seq.index, new_token_ids=new_ids, new_text=new_text,
        text=text[:visible], finished=finished,
        finish_reason=seq.finish_reason if finished else None, prompt_tokens=prompt,
        completion_tokens=n_out, cached_tokens=seq.cached_tokens, logprobs=new_lp,
        prompt_logprobs=prompt_lp, _all_ids=ids)
