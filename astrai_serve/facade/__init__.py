"""The REST facade: an OpenAI-compatible HTTP API that is only a gRPC client of the core.

app.py is the FastAPI app (chat/completions, completions, models, tokenize, health, metrics);
protocol.py turns OpenAI request bodies into GenerateRequests and responses.py turns
GenerateResponses back into OpenAI JSON and SSE chunks; core_client.py is the async gRPC client;
prometheus.py renders GetStats for /metrics; server.py runs the app under uvicorn (`astrai gateway`
is that whole process) and process.py is how `astrai serve` starts it as a child.

Holds no model state and imports no torch: only proto, auth and child_process of astrai_serve,
never engine/, kernels/, core/ or astrai_train, so it starts fast and can run on another host.
"""
