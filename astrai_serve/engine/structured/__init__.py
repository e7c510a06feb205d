"""Structured output in the engine: grammars compiled off the step loop, token bitmasks in the sampler.

Runs inside the engine (imports only the engine's own modules, torch and llguidance):

    vocab.py     the tokenizer as token bytes + special and eos ids (what a grammar engine needs)
    grammars.py  StructuredOutput (structured_spec.py) -> grammar text, per kind (JSON Schema, regex,
                 choice, Lark, tool calls)
    compiler.py  a thread pool that compiles grammars, cached by StructuredOutput.key()
    matcher.py   one sample's matcher: advanced by each generated token, `done` at the grammar's end
    bitmask.py   per step, the constrained rows' masks filled on the host, one copy to the device,
                 applied inside the batched sampler (sampler.py) before anything else
    runtime.py   the engine's side: admission (wait for the compile, or hold the request), per-step
                 advance and masks

The grammar engine is llguidance (pinned in pyproject.toml), chosen over xgrammar by measurement
(bench/grammar_engines.py, this project's 2-core x86 CPU, our byte-level BPE tokenizers of 1,024 and
30,380 tokens; llguidance 1.9.1, xgrammar 0.2.9):

                                          llguidance          xgrammar
    runtime dependencies                  none (3 MB wheel)   transformers, torch, triton, pydantic, tvm-ffi
    `import` in a fresh interpreter       0.05 s              2.3-3.7 s (it imports transformers)
    tokenizer info, 30k vocab             0.15 s              0.19-0.26 s
    compile, 30k vocab: small object      0.47 ms             2.8 ms
      nested (objects, arrays, enums)     1.0 ms              8.1 ms
      tool call (3 functions)             1.7 ms              3.1 ms
      regex / choice / Lark               0.8 / 0.8 / 1.0 ms  4.8 / 0.3 / 0.3 ms
    mask fill, 30k vocab, one matcher     20-40 µs            2-4 µs
      32 matchers in one call, per row    6-9 µs              3-6 µs
    (the fills: medians over a replayed valid output; in the engine, a row's fill plus its token's
    consume cost 20-70 µs a step on this CPU, llguidance's batched call helping only from ~8 rows)
    JSON Schema keywords it cannot honour refuses the schema  ignores some and emits invalid JSON

The last row decided it: under `uniqueItems`, `not` and `if/then/else` xgrammar compiles the schema
and then accepts output that violates it ([1,1] under uniqueItems); llguidance fails the request
with "Unimplemented keys: [...]", so whatever it accepts validates. It also needs no transformers
at run time (a dev-only dependency here), compiles faster (a new schema's time to first token) and
reads Lark with inline JSON schemas (`%json {...}`), which tool calls use. xgrammar's masks are
faster to fill (precomputed per grammar, hence its slower compile); llguidance's tens of µs per
constrained row and step are spent on the host while the step's forward runs on the device (see
llm_engine.py), which hides them for any batch whose forward outlasts them.
"""
