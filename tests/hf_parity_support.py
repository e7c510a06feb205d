"""What the model-family tests share: the serving engine's greedy tokens against HF `generate`."""
from __future__ import annotations

import torch

from astrai_serve.engine import LLMEngine, SamplingParams
from astrai_train.model import Transformer, fuse_projections


def random_ids(n: int, vocab: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_engine_matches_hf_generate(hf, directory, vocab: int, prefix_len: int, max_tokens: int,
                                      page_size: int = 4, **engine_args) -> None:
    """Two prompts behind one `prefix_len`-token prefix, run one after the other through the engine
    (paged KV, chunked prefill as engine_args ask, fused projections as LLMEngine(model_dir) runs
    them): the second hits the prefix cache for every full page of the prefix, and both greedy
    completions equal HF generate's."""
    model = Transformer.from_pretrained(directory)
    fuse_projections(model)
    engine = LLMEngine.from_model(model, None, page_size=page_size, **engine_args)
    prefix = random_ids(prefix_len, vocab, seed=1)[0].tolist()
    prompts = [prefix + random_ids(n, vocab, seed=2 + n)[0].tolist() for n in (9, 14)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.finished]
    assert outs[0].cached_tokens == 0 and outs[1].cached_tokens == prefix_len // page_size * page_size
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)[0, len(prompt):]
            assert out.token_ids == ref.tolist()
