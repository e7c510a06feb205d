"""How much an fp8 KV cache changes what a trained model says: greedy continuations with
`kv_cache_dtype="fp8"` against the model-dtype cache, beside the same comparison for bf16 weights
and cache against float32 (the change everyone already accepts).

    python bench/kv_cache_agreement.py [--model runs/demo/seq-demo/model] [--prompts 32]
    python bench/kv_cache_agreement.py --tiny           # a random toy model: a smoke run

Prompts are --prompt-tokens-token slices of a Shakespeare play from ../shared/data (a corpus the
demo model did not train on is not needed: this compares two caches, not the model with the
text). Each continuation is --max-tokens greedy tokens with ignore_eos. Per comparison: the
continuations that come out identical, the mean position of the first differing token, and the
fraction of positions that agree. Greedy decoding amplifies any change (one flipped near-tie
changes everything after it), so the bf16-vs-float32 row is the scale to read the fp8 rows
against. Runs on the CPU (float32 and bf16) or on CUDA (bf16 only).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = ("identical continuations %", "mean first divergence (token)", "positions agreeing %")


def prompts_from_corpus(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """n slices of `length` tokens from random places in one play."""
    play = sorted((REPO.parent / "shared" / "data" / "shakespeare").glob("*.txt"))[-1]
    text = play.read_text(errors="ignore")
    rng, prompts = random.Random(0), []
    while len(prompts) < n:
        start = rng.randrange(0, len(text) - 40 * length)
        ids = tokenizer.encode(text[start:start + 40 * length])[:length]
        if len(ids) == length:
            prompts.append(ids)
    return prompts


def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_tokens: int, kv: str, device: str) -> list[list[int]]:
    from astrai_serve import LLMEngine, SamplingParams

    engine = LLMEngine.from_model(model, tokenizer, max_num_seqs=len(prompts), device=device, kv_cache_dtype=kv,
                                  max_model_len=max(map(len, prompts)) + max_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [done[f"r{i}"] for i in range(len(prompts))]


def compare(a: list[list[int]], b: list[list[int]]) -> list[float]:
    firsts = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b)]
    agree = sum(u == v for x, y in zip(a, b) for u, v in zip(x, y)) / sum(len(x) for x in a)
    return [100 * sum(x == y for x, y in zip(a, b)) / len(a), sum(firsts) / len(firsts), 100 * agree]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/kv_cache_agreement.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs/demo/seq-demo/model"),
                   help="a trained model directory with its tokenizer (default: `make demo`'s pretrained model)")
    p.add_argument("--prompts", type=int, default=32, help="prompts (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (default 128)")
    p.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per continuation (default 128)")
    p.add_argument("--tiny", action="store_true", help="a random toy model and 4 short prompts (smoke run)")
    p.add_argument("--json", default="", help="where to write JSON (default none)")
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_tokens", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    import torch

    from astrai_train.model import ModelConfig, Transformer

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    torch.set_num_threads(1 if device == "cpu" else torch.get_num_threads())   # toy matmuls: one thread is fastest
    if args.tiny:
        config = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dim_ffn=128, max_len=256,
                             use_qk_norm=True, init_std=0.5)
        tokenizer, load = None, lambda dtype: Transformer(config).to(dtype)
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 300, (12,), generator=gen).tolist() for _ in range(4)]
        args.max_tokens = 8
    else:
        if not (Path(args.model) / "config.json").exists():
            p.error(f"--model {args.model}: no model directory there (run `make demo`, or name a trained model)")
        from astrai_train.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(args.model)
        load = lambda dtype: Transformer.from_pretrained(args.model, dtype=dtype)  # noqa: E731
        prompts = prompts_from_corpus(tokenizer, args.prompts, args.prompt_tokens)

    def continuations(dtype: torch.dtype, kv: str) -> list[list[int]]:
        torch.manual_seed(0)                   # (--tiny: the same random weights every time)
        model = load(dtype).to(device).eval()
        return greedy(model, tokenizer, prompts, args.max_tokens, kv, device)

    dtypes = [torch.bfloat16] if device == "cuda" else [torch.float32, torch.bfloat16]
    runs = {(dt, kv): continuations(dt, kv) for dt in dtypes for kv in ("auto", "fp8")}
    rows: list[common.Row] = []
    comparisons = [(f"fp8 cache vs {str(dt).removeprefix('torch.')} cache", runs[dt, "fp8"], runs[dt, "auto"],
                    f"{str(dt).removeprefix('torch.')} weights") for dt in dtypes]
    if device == "cpu":
        comparisons.append(("bf16 weights+cache vs float32 (the scale)", runs[torch.bfloat16, "auto"],
                            runs[torch.float32, "auto"], "no fp8"))
    for system, a, b, note in comparisons:
        for metric, value in zip(METRICS, compare(a, b)):
            rows.append(common.Row("agreement", system, metric, value,
                                   note=f"{note}; {len(prompts)} prompts x {args.max_tokens} greedy tokens"))
    common.report("bench/kv_cache_agreement.py", rows, common.environment(),
                  {"model": "tiny (random)" if args.tiny else args.model, "device": device,
                   "prompt_tokens": len(prompts[0]), "max_tokens": args.max_tokens}, args.json or None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
