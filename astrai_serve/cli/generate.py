"""`astrai generate`: complete prompts offline with the serving engine and print the results.

    astrai generate --model DIR --prompt "To be, or not" [--prompt ...] [--chat]
                    [--max-tokens 64 --min-tokens 0 --temperature 0 --top-p 1 --top-k 0 --n 1 --stop STR]
                    [--json] [engine options, e.g. --max-num-seqs 8 --device cpu]

Text goes to stdout, one completion per prompt (samples separated by a rule), or one JSON object
per sample with --json. Sampling is reproducible run to run: the engine's --seed seeds it.
Errors a user can cause print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from astrai_serve.cli.engine_args import add_engine_arguments, engine_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory (config.json, weights, tokenizer)")
    parser.add_argument("--prompt", action="append", required=True,
                        help="a prompt; repeat for several (they run batched)")
    parser.add_argument("--chat", action="store_true",
                        help="send each prompt as a user message through the chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per sample (default 64)")
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="tokens to generate before a stop token or stop string may end a sample (default 0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top prob (default 0)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable); not included in the output")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample instead of text")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from astrai_serve.engine.config import EngineConfig
    from astrai_serve.engine.sampling_params import SamplingParams

    try:
        # Cheap checks first: a typo should not wait for torch to import.
        if not args.model.is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such model directory")
        params = SamplingParams(max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                                temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                                n=args.n, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
        config = EngineConfig.build(**engine_overrides(args))
        from astrai_serve.engine.llm import LLM

        llm = LLM(args.model, config=config)
        prompts = [[{"role": "user", "content": p}] for p in args.prompt] if args.chat else list(args.prompt)
        results = llm.generate(prompts, params)
    except (ValueError, FileNotFoundError) as exc:
        print(f"astrai generate: error: {exc}", file=sys.stderr)
        return 2
    for prompt, res in zip(args.prompt, results):
        for out in res.outputs:
            if args.json:
                print(json.dumps({"prompt": prompt, "index": out.index, "text": out.text,
                                  "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                                  "prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens}))
            else:
                if len(res.outputs) > 1:
                    print(f"--- sample {out.index} ---")
                print(prompt + out.text if not args.chat else out.text)
    return 0
