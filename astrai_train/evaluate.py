"""`astrai eval`: how good is a model directory on the held-out Shakespeare tasks?

    perplexity             on held-out text (seq_eval.txt), teacher-forced windows
    speaker accuracy       greedy answer == the speaker's letter (multiple choice in the prompt)
    whole-line preference  log p(the next line) > log p(the same line cut short)  (dpo_eval.jsonl)
    arithmetic accuracy    greedy answer == the sum (of numbers never summed in training)

Each metric comes with a prior: the score of a rule that reads nothing but the held-out data's
own statistics, computed from that data, so a trained model's figure can be read against what
needs no model at all:

    perplexity             a unigram model of the held-out tokens (fitted on them: a strict bar)
    speaker accuracy       always answering the most frequent answer letter
    whole-line preference  always preferring the reply with fewer tokens (what an untrained model
                           does: fewer tokens, fewer nats); the pairs are built so this scores 0
    arithmetic accuracy    always answering the most frequent sum

Where guessing has a meaning, "chance" is reported too (uniform over the vocabulary, over the
offered options, over the possible sums).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from astrai_train.data.records import encode_record
from astrai_train.data.tasks import speaker_choices

# name -> (label, what "n" counts)
METRICS = {
    "perplexity": ("perplexity (held-out text)", "tokens"),
    "speaker_accuracy": ("speaker accuracy", "prompts"),
    "whole_line_preference": ("whole-line preference", "pairs"),
    "arithmetic_accuracy": ("arithmetic accuracy", "prompts"),
}


@dataclass(frozen=True)
class EvalConfig:
    """One `astrai eval` run."""

    model: str                  # model directory (config.json, weights, tokenizer)
    data: str                   # task directory written by `astrai tasks`
    limit: int = 200            # examples per task metric
    ppl_tokens: int = 16384     # tokens of seq_eval.txt scored for perplexity
    window: int = 256           # perplexity window (capped by the model's max_len)
    batch_size: int = 16        # sequences per forward pass / generation batch
    max_new_tokens: int = 12    # generation budget for speaker and arithmetic answers
    device: str = "cpu"         # torch device
    progress: bool = True       # a tqdm bar per metric (batches done, refreshed at least once a second)

    def __post_init__(self) -> None:
        for name in ("limit", "ppl_tokens", "window", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval {name} must be >= 1, got {getattr(self, name)}")


def _read_jsonl(path: Path, task: str | None, limit: int) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if task is None or rec.get("task") == task:
                out.append(rec)
                if len(out) >= limit:
                    break
    return out


def held_out_ids(tok, text: str, n_tokens: int) -> list[int]:
    """The first n_tokens + 1 tokens of text: n_tokens targets after the first."""
    return tok.encode(text[: n_tokens * 16])[: n_tokens + 1]  # ~4 chars a token; 16x is plenty


def unigram_perplexity(ids: list[int]) -> float:
    """Perplexity of the scored tokens (ids[1:]) under their own frequencies: the best any model
    that ignores context can do on them."""
    counts = Counter(ids[1:])
    n = sum(counts.values())
    if n == 0:
        raise ValueError("the held-out text is empty: nothing to compute perplexity on")
    return math.exp(-sum(c / n * math.log(c / n) for c in counts.values()))


def majority(answers: list[str]) -> tuple[float, str]:
    """(score, answer) of always giving the most frequent answer (ties: the first in sort order)."""
    counts = Counter(str(a).strip() for a in answers)
    answer, hits = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return hits / len(answers), answer


@torch.no_grad()
def _batches(n: int, batch_size: int, desc: str, progress: bool) -> Any:
    """Start offsets of the batches of n items, under a progress bar when asked (stderr)."""
    starts = range(0, n, batch_size)
    if not progress:
        return starts
    from tqdm import tqdm

    return tqdm(starts, desc=f"eval {desc}", unit="batch", mininterval=1.0, dynamic_ncols=True, leave=False)


def perplexity(model, tok, text: str, n_tokens: int, window: int, batch_size: int, device: str,
               progress: bool = False) -> tuple[float, int]:
    """exp(mean next-token NLL) over the first n_tokens tokens of text, in non-overlapping windows."""
    ids = held_out_ids(tok, text, n_tokens)
    window = min(window, model.config.max_len)
    rows = [ids[i:i + window + 1] for i in range(0, len(ids) - 1, window)]
    rows = [r for r in rows if len(r) > 1]
    total, count = 0.0, 0
    for b in _batches(len(rows), batch_size, "perplexity", progress):
        chunk = rows[b:b + batch_size]
        length = max(len(r) for r in chunk)
        x = torch.full((len(chunk), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), length - 1, dtype=torch.bool)
        for i, r in enumerate(chunk):
            x[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r) - 1] = True
        x = x.to(device)
        logits = model(x[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += nll[mask.to(device)].sum().item()
        count += int(mask.sum())
    if count == 0:
        raise ValueError("the held-out text is empty: nothing to compute perplexity on")
    return math.exp(total / count), count


@torch.no_grad()
def exact_match(model, tok, records: list[dict[str, Any]], batch_size: int, max_new_tokens: int,
                progress: bool = False, desc: str = "answers") -> float:
    """Fraction of prompts whose greedy answer, stripped, equals the record's answer."""
    from astrai_train.model.generate import generate

    hits = 0
    for b in _batches(len(records), batch_size, desc, progress):
        chunk = records[b:b + batch_size]
        prompts = [encode_record("grpo", r, tok)["prompt"].tolist() for r in chunk]
        outs = generate(model, prompts, max_new_tokens, eos_ids=tok.stop_ids)
        hits += sum(tok.decode(o).strip() == str(r["answer"]).strip() for o, r in zip(outs, chunk))
    return hits / len(records)


@torch.no_grad()
def _sequence_logprobs(model, ids: list[list[int]], masks: list[list[int]], pad_id: int, device: str) -> torch.Tensor:
    length = max(len(s) for s in ids)
    x = torch.full((len(ids), length), pad_id, dtype=torch.long)
    m = torch.zeros(len(ids), length, dtype=torch.bool)
    for i, (s, k) in enumerate(zip(ids, masks)):
        x[i, :len(s)] = torch.tensor(s)
        m[i, :len(k)] = torch.tensor(k, dtype=torch.bool)
    x, m = x.to(device), m.to(device)
    logp = torch.log_softmax(model(x[:, :-1]).float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
    return (logp * m[:, 1:]).sum(-1).cpu()


def preference_accuracy(model, tok, records: list[dict[str, Any]], batch_size: int, device: str,
                        progress: bool = False) -> float:
    """Fraction of pairs where the chosen completion gets the higher total log-prob."""
    wins = 0
    for b in _batches(len(records), batch_size, "preference", progress):
        enc = [encode_record("dpo", r, tok) for r in records[b:b + batch_size]]
        ids = [e["chosen"].tolist() for e in enc] + [e["rejected"].tolist() for e in enc]
        masks = [e["chosen_mask"].tolist() for e in enc] + [e["rejected_mask"].tolist() for e in enc]
        lp = _sequence_logprobs(model, ids, masks, tok.pad_id, device)
        wins += int((lp[:len(enc)] > lp[len(enc):]).sum())
    return wins / len(records)


def shorter_reply_share(tok, records: list[dict[str, Any]]) -> float:
    """Fraction of pairs whose chosen reply has fewer tokens than the rejected one: the score of
    always preferring the shorter reply."""
    enc = [encode_record("dpo", r, tok) for r in records]
    return sum(int(e["chosen_mask"].sum()) < int(e["rejected_mask"].sum()) for e in enc) / len(records)


def _choices(record: dict[str, Any]) -> list[str]:
    """The names a speaker prompt offers."""
    prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
    return speaker_choices(prompt)


def speaker_chance(records: list[dict[str, Any]]) -> float:
    """Mean 1/k over the k names each prompt offers: what a uniform guess scores."""
    return sum(1.0 / len(c) for c in map(_choices, records) if c) / len(records)


def evaluate(cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """{metric: {"value", "n", "prior", "prior_rule"[, "chance"]}} for each metric whose task file
    exists in cfg.data; "prior" is the score of the data-only rule "prior_rule" names."""
    from astrai_train.model import Transformer
    from astrai_train.tokenizer import Tokenizer

    data = Path(cfg.data)
    if not data.is_dir():
        raise FileNotFoundError(f"task directory {cfg.data!r} does not exist (create it with `astrai tasks`)")
    files = {name: data / name for name in ("seq_eval.txt", "grpo_eval.jsonl", "dpo_eval.jsonl")}
    if not any(p.is_file() for p in files.values()):
        raise FileNotFoundError(f"{cfg.data!r} has none of {', '.join(files)}; is it an `astrai tasks` directory?")
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"model directory {cfg.model!r} does not exist")
    model = Transformer.from_pretrained(cfg.model, device=cfg.device, dtype=torch.float32).eval()
    tok = Tokenizer.from_pretrained(cfg.model)
    manifest = data / "manifest.json"
    task_cfg = json.loads(manifest.read_text())["config"] if manifest.is_file() else {}
    largest_sum = task_cfg.get("max_operand", 99) + task_cfg.get("max_addend", task_cfg.get("max_operand", 99))

    results: dict[str, dict[str, float]] = {}
    if files["seq_eval.txt"].is_file():
        text = files["seq_eval.txt"].read_text(encoding="utf-8")
        ppl, n = perplexity(model, tok, text, cfg.ppl_tokens, cfg.window, cfg.batch_size, cfg.device, cfg.progress)
        results["perplexity"] = {"value": ppl, "n": n, "chance": float(tok.vocab_size),
                                 "prior": unigram_perplexity(held_out_ids(tok, text, cfg.ppl_tokens)),
                                 "prior_rule": "unigram of the held-out tokens"}
    if files["grpo_eval.jsonl"].is_file():
        speaker = _read_jsonl(files["grpo_eval.jsonl"], "speaker", cfg.limit)
        if speaker:
            prior, letter = majority([r["answer"] for r in speaker])
            results["speaker_accuracy"] = {"value": exact_match(model, tok, speaker, cfg.batch_size, cfg.max_new_tokens,
                                                                  cfg.progress, "speaker"),
                                           "n": len(speaker), "chance": speaker_chance(speaker), "prior": prior,
                                           "prior_rule": f"always {letter}, the most frequent answer"}
        arith = _read_jsonl(files["grpo_eval.jsonl"], "arithmetic", cfg.limit)
        if arith:
            prior, total = majority([r["answer"] for r in arith])
            results["arithmetic_accuracy"] = {"value": exact_match(model, tok, arith, cfg.batch_size, cfg.max_new_tokens,
                                                                     cfg.progress, "arithmetic"),
                                              "n": len(arith), "chance": 1.0 / (largest_sum + 1), "prior": prior,
                                              "prior_rule": f"always {total}, the most frequent sum"}
    if files["dpo_eval.jsonl"].is_file():
        pairs = _read_jsonl(files["dpo_eval.jsonl"], None, cfg.limit)
        if pairs:
            # No chance level: the pairs differ in length by construction, so a length rule scores
            # 0 (the shorter) or 1 (the longer); the bar a model must pass is the model it started from.
            results["whole_line_preference"] = {"value": preference_accuracy(model, tok, pairs, cfg.batch_size, cfg.device,
                                                                                cfg.progress),
                                                "n": len(pairs), "prior": shorter_reply_share(tok, pairs),
                                                "prior_rule": "always the reply with fewer tokens"}
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [f"{'metric':<28}{'value':>10}{'prior':>10}{'chance':>10}{'n':>9}        prior: the score of"]
    for name, (label, unit) in METRICS.items():
        if name in results:
            r = results[name]
            fmt = ".2f" if name == "perplexity" else ".3f"
            chance = f"{r['chance']:>10{fmt}}" if r.get("chance") is not None else f"{'-':>10}"
            lines.append(f"{label:<28}{r['value']:>10{fmt}}{r['prior']:>10{fmt}}{chance}{int(r['n']):>9} "
                         f"{unit:<8}{r['prior_rule']}")
    return "\n".join(lines)
