"""LLMEngine: requests in, incremental outputs out, one `step()` at a time.

    step = Scheduler.schedule() -> ModelRunner.execute(plan) -> Sampler -> Scheduler.update()
           -> stop checks + text deltas -> list[RequestOutput]

Requests with prompt_logprobs also score their prompt positions in the prefill steps
(prompt_logprobs.py), between the forward and the sampler.

Structured output (SamplingParams.structured; structured/): each constrained sample has a grammar
matcher, advanced by its new token right after `Scheduler.update`; the next step's sampling masks
its row with the matcher's token bitmask (filled on the host while that step's forward runs on
the device). With async scheduling the decode launched ahead runs its forward at once, on the
previous step's ids still on the device, and only its SAMPLING waits until the host has read
those ids, advanced the matchers and filled the masks (`_Deferred`). The cost, in steps with a
constrained row only: the sampling of step N+1 is enqueued after step N's host sync plus the
matcher updates and the mask fill (llguidance: 20-70 µs a constrained row on a 2-core CPU),
instead of with the forward; the device idles only if that host work outlasts step N+1's
forward. Steps without a constrained row launch exactly as before.

The engine is single-threaded: add_request / abort_request / step must be called from one
thread (the daemon's engine loop does exactly that). abort_request frees the pages at once and
emits nothing: the caller that aborts already knows the request ended.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from astrai_serve.kernels import get_attention_impl
from astrai_serve.kernels.decode_matmul import DecodeOps
from astrai_serve.kernels.fused_ops import FUSED_OPS
from astrai_train.model import Transformer, fuse_projections, kv_layout
from astrai_train.model.inference_ops import TORCH_OPS

from .config import EngineConfig
from .kv_manager import KVCacheManager
from .model_runner import ModelRunner
from .outputs import RequestOutput, advance_text, finish_reasons, make_output, new_state
from .paged_attention import PagedKVCache
from .prompt_logprobs import PromptScores, score, spans_of, tap_rows
from .sampler import PendingSample, SampleResult, Sampler
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler, StepPlan
from .sequence import Sequence, SeqStatus
from .startup import StartupTimes, use_compile_cache
from .structured.runtime import StructuredRuntime, constrained
from .transfer import to_device

Prompt = str | list[dict] | list[int]
log = logging.getLogger("astrai.serve.engine")


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index` of a seeded request: the seed itself for sample 0, a hash for the
    others, so samples differ and never share noise with the request seeded `seed + index`."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class EngineStats:
    pages_total: int                     # KV pages in the pool
    pages_in_use: int                    # pages held by running sequences
    pages_cached: int                    # pages held only by the prefix cache (reclaimable)
    num_running: int                     # sequences being computed
    num_waiting: int                     # sequences queued (new, preempted or waiting for a sibling's prefill)
    prefix_cache_hit_tokens_total: int   # prompt tokens served from the prefix cache
    prompt_tokens_total: int             # prompt tokens of all accepted requests
    generation_tokens_total: int         # tokens generated
    num_preemptions_total: int           # sequences preempted for lack of pages (recomputed later)


@dataclass
class _Deferred:
    """A launched forward whose sampling waits for the host (a constrained decode launched ahead)."""

    logits: torch.Tensor
    sampling: list[ScheduledChunk]


class LLMEngine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, **overrides: Any) -> None:
        from astrai_train.tokenizer import Tokenizer

        start = time.perf_counter()
        config = EngineConfig.build(config, **overrides)
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        model = Transformer.from_pretrained(model_dir, device=config.torch_device(), dtype=config.torch_dtype())
        # The engine owns this model: fuse q/k/v and gate/up (from_model leaves a caller's model,
        # whose optimizer may hold its parameters, as it is).
        fuse_projections(model)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        self._setup(model.eval(), tokenizer, config, StartupTimes(load_s=time.perf_counter() - start), start)

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Any = None, config: EngineConfig | None = None,
                   **overrides: Any) -> "LLMEngine":
        """Serve `model` in place (no copy): updating its weights updates what the engine runs;
        call reset_prefix_cache() afterwards, as cached K/V were computed by the old weights.
        Without a tokenizer, prompts must be token ids and outputs carry no text."""
        config = EngineConfig.build(config, **overrides)
        weight = next(model.parameters())
        if config.device is not None:
            want = torch.device(config.device)
            if want.type != weight.device.type or (want.index is not None and want.index != weight.device.index):
                raise ValueError(f"engine device={config.device!r} but the model lives on {weight.device}")
        dtype_name = str(weight.dtype).removeprefix("torch.")
        config = EngineConfig.build(config, device=str(weight.device), dtype=dtype_name)
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, config, StartupTimes(), time.perf_counter())
        return engine

    def _setup(self, model: Transformer, tokenizer: Any, config: EngineConfig, times: StartupTimes,
               start: float) -> None:
        device = config.torch_device()
        if device.type == "cuda":     # before anything JIT-compiles: kernels persist between starts
            times.cache = use_compile_cache(config.compile_cache_dir)
        mark = time.perf_counter()
        headroom = None
        if device.type == "cuda":     # batch limits from what the weights leave of the GPU
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            headroom = torch.cuda.get_device_properties(device).total_memory - weights
        self.config = config = config.sized(headroom)
        self.model_config = mc = model.config
        self.tokenizer = tokenizer
        dtype, kv_dtype = config.torch_dtype(), config.torch_kv_dtype()
        max_len = config.max_model_len or mc.max_len
        if max_len > mc.max_len:
            raise ValueError(f"max_model_len={max_len} exceeds the model's max_len={mc.max_len}")
        layout = kv_layout(mc)
        graphs = config.resolved_cuda_graphs()
        graph_batch = config.resolved_graph_max_batch() if graphs else 0
        num_pages = config.num_pages
        if num_pages is None:
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * config.gpu_memory_utilization)
                # Graphs keep logits for their largest batch (2 bytes a value; the sampler's fp32
                # copies for log-probs or penalties take 4 more) and a pool of activations: leave
                # room for them beside the KV cache.
                budget -= graph_batch * mc.vocab_size * 6 + (256 << 20 if graphs else 0)
            else:
                budget = config.kv_cache_memory_bytes
            num_pages = PagedKVCache.pages_for_budget(budget, layout, mc.n_layers, config.page_size, kv_dtype)
            if graphs:
                num_pages -= 1          # the padding page comes out of the same budget
            if num_pages < 1:
                raise ValueError(f"a KV budget of {budget} bytes holds no page of {config.page_size} tokens "
                                 f"({layout.bytes_per_token(mc.n_layers, kv_dtype)} bytes per token)")
        # With graphs the cache holds one page more than the pool hands out: padding rows write there.
        cache = PagedKVCache(layout, mc.n_layers, num_pages + int(graphs), config.page_size, kv_dtype, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.kv_cache_s = time.perf_counter() - mark
        mark = time.perf_counter()
        kernel = get_attention_impl(config.resolved_attention_impl())
        self.kv = KVCacheManager(num_pages, config.page_size, config.enable_prefix_cache)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, max_len)
        # from_model's module is left in whatever mode its owner put it (training, for GRPO).
        self.runner = ModelRunner(model, cache, kernel, device, config.max_num_seqs, max_len,
                                  pad_page=num_pages if graphs else None, graph_max_batch=graph_batch,
                                  graph_budget_s=config.cuda_graph_capture_budget_s,
                                  compile_graphs=config.resolved_compile_decode(),
                                  cascade=config.cascade_attention,
                                  decode_ops=DecodeOps(config.resolved_decode_pdl()) if config.resolved_decode_gemv() else None,
                                  ops=FUSED_OPS if config.resolved_fused_kernels() else TORCH_OPS)
        self.sampler = Sampler(device, config.seed)
        if graphs:
            self.sampler.warm_up(mc.vocab_size, dtype)
        times.graphs_s = time.perf_counter() - mark if graphs else 0.0
        times.total_s = time.perf_counter() - start
        self.startup = times
        log.info("%s", times.describe())
        self._overlap = config.resolved_overlap_steps()
        self._async = config.resolved_async_scheduling()
        self.num_async_steps = 0             # steps launched on ids still on the device (tests, stats)
        self._inflight: tuple[StepPlan, list[Sequence], PendingSample | None] | None = None  # launched, not yet applied
        self._requests: dict[str, list[Sequence]] = {}
        # Sequences whose prompt log-probs are still to compute (empty: no step looks for any).
        self._scoring: set[Sequence] = set()
        # Grammars for structured output (None without a tokenizer): its llguidance tokenizer
        # starts building on a worker thread now, so the first constrained request finds it.
        self._structured = (StructuredRuntime(tokenizer, mc.vocab_size, device, config.structured_compile_wait_s)
                            if tokenizer is not None else None)
        self._next_id = 0
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0

    # ---- requests ----------------------------------------------------------------------------
    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this engine has none (give token ids)")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"prompt must be a non-empty string, chat message list or token-id list; "
                             f"got {type(prompt).__name__} {prompt!r:.60}")
        if all(isinstance(m, dict) for m in prompt):
            if self.tokenizer is None:
                raise ValueError("chat messages need a tokenizer; this engine has none (give token ids)")
            return list(self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True))
        vocab = self.model_config.vocab_size
        ids = list(prompt)
        # The check in C (a set of types, min, max): per token in Python it took 0.2 s for W2's
        # 256 prompts of ~2,100 ids, a quarter of that run. The loop below only names the culprit.
        if set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) < vocab:
            return ids
        for i, t in enumerate(ids):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {i} is {t!r}: token ids must be integers in [0, {vocab})")
        return ids

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    stream: bool = True) -> None:
        """Queue a request. stream=False: step() returns each sample's output only once it is
        finished (its deltas then hold everything), which saves building one per step."""
        params = SamplingParams() if params is None else params
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if params.structured is not None and self._structured is None:
            raise ValueError("structured output needs a tokenizer; this engine has none")
        vocab = self.model_config.vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:   # out of range it would index past the logits inside a batched step
            raise ValueError(f"invalid sampling parameter logit_bias={{{bad}: {params.logit_bias[bad]!r}}}: "
                             f"token id {bad} is outside the vocabulary [0, {vocab})")
        ids = self._encode(prompt)
        self.scheduler.check_prompt(len(ids))
        # Sample 0 computes (and scores) the prompt; the others reuse its pages and its scores.
        scores = None if params.prompt_logprobs is None else PromptScores(len(ids))
        samples = []
        for i in range(params.n):
            seq = Sequence(seq_id=self._next_id, request_id=request_id, index=i, token_ids=list(ids),
                           num_prompt_tokens=len(ids), params=params, arrival=self._next_id, stream=stream)
            self._next_id += 1
            seed = None if params.seed is None else sample_seed(params.seed, i)
            seq.state = new_state(seq, self.tokenizer, seed, scores)
            samples.append(seq)
        # A grammar compiled in time (or cached) starts the request now; one still compiling holds
        # it outside the scheduler (step() admits it once compiled); a bad one raises here.
        held = params.structured is not None and not self._structured.admit(request_id, params.structured, samples)
        if scores is not None:
            samples[0].score_prompt = True
            self._scoring.add(samples[0])
        if not held:
            self.scheduler.add(samples)
        self._requests[request_id] = samples
        self._prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str) -> None:
        if self._structured is not None:
            self._structured.cancel(request_id)
        for seq in self._requests.pop(request_id, []):
            self._scoring.discard(seq)
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                self.sampler.release(seq.seq_id)
                self._release_grammar(seq)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or self._inflight is not None
                or (self._structured is not None and bool(self._structured.held)))

    def _release_grammar(self, seq: Sequence) -> str | None:
        """Drop a finished sample's matcher; the error it ended with, if any."""
        m = seq.state.grammar
        if m is None:
            return None
        seq.state.grammar = None
        self._structured.live -= 1
        return m.error

    def _admit_compiled(self) -> list[RequestOutput]:
        """Start the held requests whose grammar has compiled; end those whose grammar failed
        (their one output carries the error). Waits a little when nothing else could run."""
        idle = self._inflight is None and not self.scheduler.has_unfinished()
        outputs = []
        for held, error in self._structured.take_ready(block=idle):
            if self._requests.get(held.request_id) is not held.samples:
                continue                     # aborted meanwhile
            if error is None:
                self.scheduler.add(held.samples)
                continue
            log.warning("request %s failed: %s", held.request_id, error)
            self._requests.pop(held.request_id)
            for seq in held.samples:
                self._scoring.discard(seq)
                self.scheduler.finish(seq, "abort")
                out = make_output(seq, finished=True)
                out.error = error
                outputs.append(out)
        return outputs

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one model step and return its outputs.

        With overlap_steps, the NEXT step is scheduled and launched before this step's text and
        outputs are built, so that CPU work runs while the GPU computes; requests added after
        this call returns join one step later than they would otherwise. Tokens are the same.

        With async_scheduling, a pure decode step in flight is followed by the next decode of the
        same sequences launched BEFORE waiting for its sampled ids: the device feeds them in
        (`_launch_ahead`), so the GPU never idles while the host reads ids, checks stops and
        schedules. A sequence that turns out to have stopped has computed one token for nothing,
        which the next update drops.
        """
        early = self._admit_compiled() if self._structured is not None and self._structured.held else []
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            inflight = self._launch(self.scheduler.schedule())
            if inflight is None:
                return early
        plan, seqs, pending = inflight
        ahead = self._launch_ahead(plan, pending) if self._async else None
        result = pending.result() if pending is not None else SampleResult([], [])  # the one host sync
        if any(lp is not None for lp in result.logprobs):
            for seq, lp in zip(seqs, result.logprobs):
                # (max_tokens=0: the token is dropped, and so is its log-prob)
                if lp is not None and not seq.is_finished and seq.params.max_tokens:
                    seq.state.logprobs.append(lp)
        grew = self.scheduler.update(plan, result.token_ids)
        if self._structured is not None and self._structured.live:
            self._structured.advance(grew)     # before the stop checks: the grammar may have ended
        self._generation_tokens_total += len(grew)
        if self._scoring:
            for seq in grew:            # its prompt is computed: scored, and free to use the cache
                if seq.score_prompt:
                    seq.score_prompt = False
                    self._scoring.discard(seq)
        reasons, later = finish_reasons(grew, self.scheduler.max_seq_len)
        errors: dict[int, str] = {}
        if self._structured is not None and self._structured.live:
            for i, seq in enumerate(grew):
                if seq.state.grammar is not None and seq.state.grammar.error is not None:
                    reasons[i] = "abort"            # the matcher failed (a grammar limit): end it, say why
        for i, (seq, reason) in enumerate(zip(grew, reasons)):
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.sampler.release(seq.seq_id)
                if seq.state.grammar is not None and (error := self._release_grammar(seq)) is not None:
                    errors[i] = error
                if not seq.params.max_tokens:   # grew by no token: max_tokens=0
                    self._generation_tokens_total -= 1
        if ahead is not None:
            if isinstance(ahead[2], _Deferred):   # the matchers are up to date now: sample
                ahead = (ahead[0], ahead[1], self._sample(ahead[2].logits, ahead[2].sampling))
            self._inflight = ahead
        elif self._overlap:
            self._inflight = self._launch(self.scheduler.schedule())
        advance_text(grew, reasons, later)
        outputs = early
        for i, (seq, reason) in enumerate(zip(grew, reasons)):
            if reason is None and not seq.stream:
                continue
            outputs.append(make_output(seq, finished=reason is not None))
            if i in errors:
                outputs[-1].error = errors[i]
            if reason is not None and all(s.is_finished for s in self._requests.get(seq.request_id, [])):
                self._requests.pop(seq.request_id, None)
        return outputs

    def _launch(self, plan: StepPlan, fed: torch.Tensor | None = None, defer: bool = False
                ) -> tuple[StepPlan, list[Sequence], PendingSample | _Deferred | None] | None:
        """Enqueue a step's forward and sampling on the device; nothing waits for it here.
        fed: a decode's input ids on the device (see `_launch_ahead`); defer: enqueue the forward
        only, and return what `_sample` needs later."""
        if not plan.chunks:
            return None
        spans = spans_of(plan.chunks, self._scoring) if self._scoring else None
        logits, hidden = self.runner.execute(plan, fed, tap_rows(spans) if spans else None)
        if spans:   # enqueued before the sampling, so the step's one sync covers it as well
            pending = score(self.runner.model, hidden, spans)
            for i, span in enumerate(spans):
                span.seq.state.prompt_scores.add(span.first, pending, i)
        sampling = [c for c in plan.chunks if c.samples]
        seqs = [c.seq for c in sampling]
        if not seqs:
            return plan, seqs, None
        if defer:
            return plan, seqs, _Deferred(logits, sampling)
        return plan, seqs, self._sample(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledChunk]) -> PendingSample:
        """Enqueue the sampling of a launched forward's rows (one per sampling chunk)."""
        seqs = [c.seq for c in sampling]
        params = [s.params for s in seqs]
        histories = keys = None
        if any(p.uses_penalties for p in params):
            histories = [(s.token_ids, s.num_prompt_tokens) for s in seqs]
            keys = [s.seq_id for s in seqs]       # counts kept on the device, advanced per step
        # the position each row samples: its length once this step's token is in (a sampling
        # chunk ends at the newest token, or one past it for a step launched ahead)
        positions = [c.start + c.num_tokens for c in sampling]
        banned = None
        if any(p.min_tokens for p in params):
            # below min_tokens (counting what it has before this step's token), a row may not stop
            banned = [s.state.stop_ids if pos - s.num_prompt_tokens < s.params.min_tokens else None
                      for s, pos in zip(seqs, positions)]
        grammar = None
        if self._structured is not None and self._structured.live and constrained(seqs):
            grammar = self._structured.masks(seqs)
        return self.sampler.sample_async(logits, params, [s.state.seed for s in seqs], positions,
                                         histories, keys, banned, grammar)

    def _launch_ahead(self, plan: StepPlan, pending: PendingSample | None
                      ) -> tuple[StepPlan, list[Sequence], PendingSample | None] | None:
        """Launch the decode that follows `plan` (in flight, a pure decode) on its sampled ids
        while they are still on the device; None where the host must see them first:
        - a step that is not a pure decode, or whose rows use penalties (their counts need the
          new tokens on the host);
        - a waiting request could be admitted (a sequence ends at `plan` by length, or there is
          a free slot): the normal schedule admits it one step sooner;
        - a sequence needs a page and none is free (the normal schedule preempts).
        Sequences that reach max_tokens at `plan` are left out; ones that stop on a stop token
        or string are not known yet: their extra token is dropped by the next update. With a
        constrained row, only the forward is enqueued here (step() samples once the matchers
        have the ids)."""
        if pending is None or not all(c.num_tokens == 1 and c.samples for c in plan.chunks):
            return None
        sched, running = self.scheduler, SeqStatus.RUNNING
        rows, chunks, ending = [], [], 0
        for i, c in enumerate(plan.chunks):
            seq = c.seq
            if seq.status is not running:
                continue
            if seq.params.uses_penalties:
                return None
            length = c.start + 2                       # its tokens once `plan`'s token is in
            if length - seq.num_prompt_tokens >= seq.params.max_tokens or length >= sched.max_seq_len:
                ending += 1
                continue
            rows.append(i)
            chunks.append(ScheduledChunk(seq, c.start + 1, 1, True))
        if not chunks or (sched.waiting and len(sched.running) - ending < sched.max_num_seqs):
            return None
        if not all(self.kv.ensure(c.seq, c.start + 1) for c in chunks):
            return None
        fed = pending.tokens
        if len(rows) < len(plan.chunks):
            fed = fed[to_device(rows, torch.int64, fed.device)]
        self.num_async_steps += 1
        defer = self._structured is not None and self._structured.live > 0 and constrained([c.seq for c in chunks])
        return self._launch(StepPlan(chunks), fed, defer)

    # ---- state -------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        cached = self.kv.num_cached_only()
        return EngineStats(
            pages_total=self.kv.num_pages, pages_in_use=self.kv.pool.num_used - cached, pages_cached=cached,
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting + (self._structured.num_held if self._structured else 0),
            prefix_cache_hit_tokens_total=self.scheduler.prefix_cache_hit_tokens_total,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_preemptions_total=self.scheduler.num_preemptions_total)

    def reset_prefix_cache(self) -> None:
        """Forget all cached prefixes (call after the model's weights changed)."""
        self.kv.reset_prefix_cache()

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + output a request can reach (model context, capped by the KV pool)."""
        return self.scheduler.max_seq_len
