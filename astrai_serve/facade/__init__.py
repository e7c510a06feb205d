"""The REST facade: an OpenAI-compatible HTTP API that is only a gRPC client of the core.

app.py is the FastAPI app (chat/completions, completions, models, tokenize, health, metrics);
protocol.py turns OpenAI request bodies into GenerateRequests (chat.py: messages, tools,
tool_choice and template options; structured.py: response_format / structured_outputs / guided_*;
errors.py: OpenAI's error shape) and responses.py turns GenerateResponses back into OpenAI JSON
and SSE chunks, reading tool calls out of the text with tool_parser.py; core_client.py is the
async gRPC client; disconnect.py races each wait on the core against the client hanging up;
messages_protocol.py and messages_api.py are Anthropic's /v1/messages (request, reply, stream);
responses_api.py is OpenAI's Responses API, /v1/responses (a Responses body as a chat request;
the Response object and its SSE events);
prometheus.py renders GetStats for /metrics; server.py runs the app under uvicorn (`astrai gateway`
is that whole process) and process.py is how `astrai serve` starts it as a child.

Holds no model state and imports no torch: only proto, auth and child_process of astrai_serve,
never engine/, kernels/, core/ or astrai_train, so it starts fast and can run on another host.
"""
