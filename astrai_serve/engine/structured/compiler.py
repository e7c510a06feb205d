"""GrammarCompiler: StructuredOutput -> a compiled matcher, in a thread pool, cached by spec.key().

A compiled grammar is an llguidance `LLMatcher` that has consumed nothing (the cache's template);
each sample gets a `deep_copy()` of it (~10 µs). Compiling takes about 0.4-2 ms for everyday
schemas and tens of ms for large ones (a 300-property schema: 25 ms; a 20,000-value enum: 70 ms,
this 2-core CPU), so it runs on worker threads (llguidance releases the GIL while it builds) and
the engine's step loop only looks at futures. The llguidance tokenizer (the vocabulary as a token
trie) is built once, on the pool too, as soon as the engine starts.

Failures are cached like successes: the same schema fails the same way. The cache is an LRU of
`capacity` grammars; `num_compiled` counts real compilations (cache misses), for tests and stats.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..structured_spec import StructuredOutput
from .grammars import error_for, grammar_of
from .vocab import VocabInfo


def build_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's tokenizer over the model's vocabulary (ids past the tokenizer's get no bytes)."""
    import llguidance

    info = VocabInfo.of(tokenizer, vocab_size)

    class _Wrapper:   # what llguidance.TokenizerWrapper reads from a tokenizer object
        tokens = info.tokens
        eos_token_id = tokenizer.eos_id
        bos_token_id = tokenizer.bos_id
        special_token_ids = sorted(info.special_ids)

        def __call__(self, text: bytes) -> list[int]:
            return tokenizer.encode(text.decode("utf-8", errors="replace"))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper()), n_vocab=vocab_size,
                                  eos_token=sorted(info.eos_ids) or [tokenizer.eos_id])


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, threads: int = 2, capacity: int = 512) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="astrai-grammar")
        self._tokenizer: Future = self._pool.submit(build_tokenizer, tokenizer, vocab_size)
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()   # the cache is touched by the engine thread only, the count by workers
        self.capacity = capacity
        self.num_compiled = 0

    @property
    def ll_tokenizer(self) -> Any:
        return self._tokenizer.result()

    def has(self, spec: StructuredOutput) -> bool:
        """Whether `spec` is in the cache (compiled, or compiling)."""
        return spec.key() in self._cache

    def compile(self, spec: StructuredOutput) -> Future:
        """The future of `spec`'s template matcher (done at once on a cache hit). Its exception,
        if any, is a ValueError naming the spec's field."""
        key = spec.key()
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._compile, spec)
        self._cache[key] = future
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return future

    def _compile(self, spec: StructuredOutput) -> Any:
        import llguidance

        with self._lock:
            self.num_compiled += 1
        try:
            grammar = grammar_of(spec)
            matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        except Exception as err:  # noqa: BLE001 - whatever the library raises fails this request only
            raise error_for(spec, f"{type(err).__name__}: {err}") from None
        if matcher.is_error():
            raise error_for(spec, matcher.get_error())
        return matcher

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
