"""LLM: the offline API. Give it prompts, get every completion back, batched by the engine.

    from astrai_serve import LLM, SamplingParams
    llm = LLM("path/to/model", max_num_seqs=32)
    results = llm.generate(["To be, or not", "Once more unto"], SamplingParams(max_tokens=32))
    print(results[0].text)

Structured output: the text must match a JSON Schema (or a regex, a choice, a Lark grammar, a tool
call: see StructuredOutput), enforced token by token:

    import json
    from astrai_serve.engine.structured_spec import StructuredOutput
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = SamplingParams(max_tokens=64, structured=StructuredOutput(json=json.dumps(schema)))
    person = json.loads(llm.generate("Name a king:", params)[0].text)   # when finish_reason == "stop"
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .generation_defaults import generation_defaults
from .llm_engine import LLMEngine, Prompt
from .sampler import Logprob
from .sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int                            # sample index (0..n-1)
    token_ids: list[int]                  # generated tokens
    text: str                             # generated text ("" without a tokenizer)
    finish_reason: str | None             # "stop" | "length"
    logprobs: list[Logprob] | None = None  # per token, when asked for


@dataclass
class GenerationResult:
    request_id: str
    prompt_tokens: int                    # tokens in the prompt
    cached_tokens: int                    # of which served by the prefix cache
    outputs: list[CompletionOutput] = field(default_factory=list)  # one per sample
    prompt_logprobs: list[Logprob | None] | None = None  # with SamplingParams.prompt_logprobs: per prompt token, the first None

    # The first sample, for the common n=1 case.
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self.outputs[0].token_ids)


def _as_prompt_list(prompts: Any) -> list[Prompt]:
    """One prompt (text, a chat, token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, dict)):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a string, a chat, token ids or a list of those; "
                         f"got {type(prompts).__name__}")
    return list(prompts)


class LLM:
    def __init__(self, model_dir: str | Path, generation_config: str = "auto", **engine_args: Any) -> None:
        """generation_config: where `generate(prompts)` without params takes its sampling defaults
        (generation_defaults.py): "auto" the model directory's generation_config.json, "none"
        SamplingParams' own, or a directory; see default_sampling_params()."""
        self._defaults = generation_defaults(model_dir, generation_config)
        self.engine = LLMEngine(model_dir, **engine_args)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any = None, **engine_args: Any) -> "LLM":
        llm = cls.__new__(cls)
        llm._defaults = {}
        llm.engine = LLMEngine.from_model(model, tokenizer, **engine_args)
        return llm

    def default_sampling_params(self) -> SamplingParams:
        """What generate() uses when given no params: the model's generation_config.json values
        over SamplingParams' defaults (vLLM's LLM.get_default_sampling_params)."""
        return SamplingParams(**self._defaults)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(self, prompts: Any, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[GenerationResult]:
        """Complete every prompt; results come back in the order of the prompts. A bad request
        (a bad parameter, a structured-output schema that does not compile) raises ValueError."""
        prompts = _as_prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.default_sampling_params()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        base = f"llm-{id(self):x}-{engine._next_id}-"
        results: dict[str, GenerationResult] = {}
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                rid = base + str(i)
                engine.add_request(rid, prompt, p, stream=False)   # only finished outputs are used
                results[rid] = GenerationResult(rid, 0, 0, [None] * p.n)  # type: ignore[list-item]
            bar = None
            if use_tqdm:
                from tqdm import tqdm
                bar = tqdm(total=sum(p.n for p in params), desc="generate", unit="sample")
            logprobs: dict[tuple[str, int], list] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.error is not None:   # failed after add_request accepted it (a grammar that did not compile)
                        raise ValueError(out.error)
                    if out.prompt_logprobs is not None:
                        results[out.request_id].prompt_logprobs = out.prompt_logprobs
                    if out.logprobs is not None:
                        logprobs.setdefault((out.request_id, out.index), []).extend(out.logprobs)
                    if not out.finished:
                        continue
                    res = results[out.request_id]
                    res.prompt_tokens = out.prompt_tokens
                    if out.index == 0:   # samples > 0 reuse sample 0's prompt pages; report the request's hit
                        res.cached_tokens = out.cached_tokens
                    res.outputs[out.index] = CompletionOutput(out.index, out.token_ids, out.text,
                                                              out.finish_reason,
                                                              logprobs.pop((out.request_id, out.index), None))
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in results:
                engine.abort_request(rid)
            raise
        return list(results.values())
