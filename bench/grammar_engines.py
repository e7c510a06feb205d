"""Grammar engines for structured output, measured side by side on this CPU with our tokenizer.

    python bench/grammar_engines.py --tokenizer MODEL_OR_TOKENIZER_DIR [--engines llguidance,xgrammar]

For each engine that imports: the import time (a fresh interpreter), the tokenizer-info build, the
compile time of a few JSON schemas (small object; nested with arrays and enums; a 3-function tool
call), a regex, a choice and a Lark grammar, the per-token mask fill while replaying a valid output
(one matcher, and 32 matchers filled in one batched call), and which JSON Schema features compile.
It prints one table. astrai_serve/engine/structured/ took its engine from these figures (its
docstring has them); xgrammar is not a dependency of astrai: `pip install xgrammar` to compare.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
         "required": ["name", "age"], "additionalProperties": False}
NESTED = {
    "type": "object", "additionalProperties": False,
    "required": ["id", "owner", "tags", "status", "items"],
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "owner": {"type": "object", "required": ["name", "address"], "additionalProperties": False,
                  "properties": {"name": {"type": "string", "maxLength": 40},
                                 "address": {"type": "object", "required": ["city", "zip"],
                                             "additionalProperties": False,
                                             "properties": {"city": {"type": "string"},
                                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "status": {"enum": ["open", "closed", "pending"]},
        "score": {"type": "number"},
        "items": {"type": "array", "items": {"type": "object", "required": ["sku", "qty"],
                                             "additionalProperties": False,
                                             "properties": {"sku": {"type": "string"},
                                                            "qty": {"type": "integer", "minimum": 1}}}},
    },
}
NESTED_VALUE = {"id": 7, "owner": {"name": "Ada Lovelace", "address": {"city": "London", "zip": "12345"}},
                "tags": ["math", "engines"], "status": "open", "score": 9.5,
                "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-22", "qty": 1}]}


def _call(name: str, params: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": name}, "arguments": params}}


TOOLS = [_call("get_weather", {"type": "object", "required": ["city"], "additionalProperties": False,
                               "properties": {"city": {"type": "string"},
                                              "unit": {"enum": ["celsius", "fahrenheit"]}}}),
         _call("search", {"type": "object", "required": ["query"], "additionalProperties": False,
                          "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}),
         _call("send_mail", {"type": "object", "required": ["to", "body"], "additionalProperties": False,
                             "properties": {"to": {"type": "array", "items": {"type": "string"}},
                                            "body": {"type": "string"}}})]
TOOL_LARK = ("start: call (\"\\n\" call)*\n"
             "call: \"<tool_call>\\n\" obj \"\\n</tool_call>\"\n"
             "obj: %json " + json.dumps({"anyOf": TOOLS}) + "\n")
TOOL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
REGEX = r"[A-Z][a-z]{2,8} (19|20)[0-9]{2}-[0-9]{2}-[0-9]{2}"
CHOICE = ["positive", "negative", "neutral", "mixed feelings"]
LARK = ('start: expr\nexpr: term (("+" | "-") term)*\nterm: factor (("*" | "/") factor)*\n'
        'factor: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n')
FEATURES = {
    "$ref/$defs": {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}}},
                   "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array",
                                                                                  "items": {"$ref": "#/$defs/n"}}}}},
                       "$ref": "#/$defs/n"},
    "anyOf": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    "oneOf": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}}, {"required": ["a"]}]},
    "pattern": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
    "minimum/maximum": {"type": "integer", "minimum": 1, "maximum": 100},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "min/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "const": {"const": "x"},
    "type list": {"type": ["string", "null"]},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "min/maxProperties": {"type": "object", "minProperties": 1, "maxProperties": 2},
    "if/then/else": {"if": {"type": "string"}, "then": {"minLength": 1}, "else": {"type": "integer"}},
    "not": {"not": {"type": "string"}},
}


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def import_time(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


class LLG:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

        self.llg, self.fill, self.fill_par = llguidance, fill_next_token_bitmask, fill_next_token_bitmask_par
        self.vocab = tok.vocab_size
        self.build_s, self.tok = _timed(lambda: llguidance.LLTokenizer(
            tok.backend.to_str(), n_vocab=tok.vocab_size, eos_token=sorted(tok.stop_ids)))
        self.executor = llguidance.LLExecutor()

    def _grammar(self, kind: str, value):
        M = self.llg.LLMatcher
        if kind == "json":
            return M.grammar_from_json_schema(json.dumps(value), defaults={"whitespace_flexible": False})
        if kind == "regex":
            return M.grammar_from_regex(value)
        if kind == "choice":
            return M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        return M.grammar_from_lark(value)

    def compile(self, kind: str, value):
        m = self.llg.LLMatcher(self.tok, self._grammar(kind, value), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill_one(self, m, mask):
        self.fill(m, mask, 0)

    def fill_many(self, ms, mask):
        self.fill_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def accept(self, m, token) -> bool:
        return m.consume_token(token)

    def done(self, m) -> bool:
        return m.is_accepting()


class XGR:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar

        from astrai_serve.engine.structured.vocab import token_bytes

        self.xgr = xgrammar
        self.vocab = tok.vocab_size

        def build():
            info = xgrammar.TokenizerInfo(token_bytes(tok), xgrammar.VocabType.RAW,
                                          vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.stop_ids))
            return xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.build_s, self.compiler = _timed(build)
        self.batch = xgrammar.BatchGrammarMatcher(2)

    def compile(self, kind: str, value):
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(value), any_whitespace=False, separators=(",", ":"))
        if kind == "regex":
            return c.compile_regex(value)
        if kind == "choice":
            return c.compile_lark("start: " + " | ".join(json.dumps(x) for x in value))
        return c.compile_lark(value)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill_one(self, m, mask):
        m.fill_next_token_bitmask(mask, 0)

    def fill_many(self, ms, mask):
        self.batch.batch_fill_next_token_bitmask(ms, mask)

    def accept(self, m, token) -> bool:
        return m.accept_token(token)

    def done(self, m) -> bool:
        return m.is_completed() or m.is_terminated()


def replay(engine, tok, compiled, text: str, n_batch: int = 32) -> tuple[float, float, int]:
    """(median µs of one fill, median µs per row of a 32-row batched fill, tokens) replaying `text`."""
    import torch

    ids = tok.encode(text)
    words = (engine.vocab + 31) // 32
    mask = torch.zeros((n_batch, words), dtype=torch.int32)
    arr = mask.numpy() if engine.name == "llguidance" else mask
    m = engine.matcher(compiled)
    single = []
    for t in ids:
        start = time.perf_counter()
        engine.fill_one(m, arr)
        single.append(time.perf_counter() - start)
        bits = mask[0].numpy().view(np.uint32)
        if not (bits[t // 32] >> (t % 32)) & 1:
            raise AssertionError(f"{engine.name}: token {t} of a valid output is masked off")
        if not engine.accept(m, t):
            raise AssertionError(f"{engine.name}: token {t} refused")
    ms = [engine.matcher(compiled) for _ in range(n_batch)]
    batched = []
    for t in ids:
        start = time.perf_counter()
        engine.fill_many(ms, arr)
        batched.append(time.perf_counter() - start)
        for x in ms:
            engine.accept(x, t)
    return float(np.median(single)) * 1e6, float(np.median(batched)) / n_batch * 1e6, len(ids)


def measure(engine, tok) -> dict:
    row = {"tokenizer_info_s": engine.build_s}
    cases = {"small": ("json", SMALL, json.dumps({"name": "Ada", "age": 36})),
             "nested": ("json", NESTED, json.dumps(NESTED_VALUE)),
             "tools": ("grammar", TOOL_LARK, TOOL_TEXT),
             "regex": ("regex", REGEX, "March 2024-05-17"),
             "choice": ("choice", CHOICE, "mixed feelings"),
             "lark": ("grammar", LARK, "(12+3)*4-5")}
    for name, (kind, value, text) in cases.items():
        if engine.name == "xgrammar" and name == "tools":    # its Lark has no %json: the same as a schema
            kind, value = "json", {"anyOf": [t for t in TOOLS]}
            text = TOOL_TEXT.split("\n")[1]
        try:
            row[f"compile_{name}_ms"], compiled = _timed(lambda: engine.compile(kind, value), repeat=3)
            row[f"compile_{name}_ms"] *= 1e3
            row[f"matcher_{name}_us"] = _timed(lambda: engine.matcher(compiled), repeat=5)[0] * 1e6
            if engine.name == "xgrammar":      # compact JSON: our replay text has ", " and ": "
                text = text.replace(", ", ",").replace(": ", ":") if kind == "json" else text
            elif kind == "json":
                text = text.replace(", ", ",").replace(": ", ":")
            row[f"fill_{name}_us"], row[f"fill32_{name}_us"], _ = replay(engine, tok, compiled, text)
        except Exception as err:  # noqa: BLE001 - a table cell, not a crash
            row[f"compile_{name}_ms"] = f"error: {err!s:.80}"
    supported = []
    for feature, schema in FEATURES.items():
        try:
            engine.compile("json", schema)
            supported.append(feature)
        except Exception:  # noqa: BLE001
            pass
    row["json_features"] = f"{len(supported)}/{len(FEATURES)}: missing " + ", ".join(
        f for f in FEATURES if f not in supported)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a directory with tokenizer.json")
    ap.add_argument("--engines", default="llguidance,xgrammar")
    args = ap.parse_args()
    import torch

    from astrai_train.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_pretrained(args.tokenizer)
    rows = {}
    for name in args.engines.split(","):
        try:
            cls = {"llguidance": LLG, "xgrammar": XGR}[name]
            engine = cls(tok)
        except ImportError as err:
            print(f"{name}: not installed ({err})")
            continue
        rows[name] = {"import_s": import_time(name), **measure(engine, tok)}
    print(f"tokenizer: {args.tokenizer} (vocab {tok.vocab_size})")
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"{'metric':24}" + "".join(f"{n:>22}" for n in rows))
    for k in keys:
        if k == "json_features":
            continue
        cells = [rows[n].get(k, "") for n in rows]
        print(f"{k:24}" + "".join(f"{c:>22.3f}" if isinstance(c, float) else f"{str(c):>22.22}" for c in cells))
    for n, r in rows.items():
        print(f"{n} JSON Schema features {r['json_features']}")


if __name__ == "__main__":
    main()
