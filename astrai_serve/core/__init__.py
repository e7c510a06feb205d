"""The gRPC core: the `astrai serve` process that owns the engine.

server.py serves astrai.v1.GenerationService (Generate streams, Tokenize, ModelInfo, GetStats), the
standard health service and reflection; request_checks.py turns a GenerateRequest into token ids
and SamplingParams (rendering chats, tools included, and tokenizing here, off the engine thread;
constraints.py maps its output constraint to SamplingParams.structured); metrics.py keeps the latency
histograms GetStats ships. The engine runs behind an EngineHandle: engine_loop.py runs it on a
thread of this process, engine_process.py in a child process of its own (the default), whose
`child_main` is the engine process's entry point.

May import astrai_serve.engine (in the engine's thread or process only), proto, auth, child_process
and astrai_train's tokenizer; never facade/ or cli/.
"""
