"""The REST facade's side of the gRPC contract: a small async client of GenerationService, and
the mapping from gRPC status codes to OpenAI-shaped HTTP errors."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from astrai_serve.proto.contract import ERROR_CODE_KEY, ERROR_PARAM_KEY, MAX_MESSAGE_BYTES
from astrai_serve.facade.errors import ApiError
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto import generate_pb2_grpc as pb_grpc

# Core field names -> the OpenAI field a client would recognise.
_PARAM_NAMES = {"text": "prompt", "token_ids": "prompt", "input": "prompt"}
# Per-stream HTTP/2 receive window. Small on purpose: when the facade (or its HTTP client) lags, a
# stream holds only a few messages here, then the core's writes wait and the core coalesces the
# backlog into fewer, larger messages. With gRPC's defaults (64 KiB, grown to megabytes by BDP
# probing) the lag would instead pile up here as thousands of one-token messages, each costing
# the facade a read and an SSE chunk. About 20 one-token messages; a larger message still passes.
STREAM_WINDOW_BYTES = 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
    ("grpc.http2.bdp_probe", 0),  # BDP probing would grow the window again
]


class CoreClient:
    """One grpc.aio channel to the core; create it inside the event loop that will use it."""

    def __init__(self, target: str, api_key: str | None = None):
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._info: pb.ModelInfoResponse | None = None

    async def model_info(self, timeout: float = 5.0) -> pb.ModelInfoResponse:
        """Cached after the first success: what is served does not change while the core runs."""
        if self._info is None:
            self._info = await self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata,
                                                   timeout=timeout, wait_for_ready=True)
        return self._info

    def generate(self, request: pb.GenerateRequest) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(request, metadata=self.metadata)

    async def tokenize(self, request: pb.TokenizeRequest) -> pb.TokenizeResponse:
        return await self.stub.Tokenize(request, metadata=self.metadata)

    async def detokenize(self, request: pb.DetokenizeRequest) -> pb.DetokenizeResponse:
        return await self.stub.Detokenize(request, metadata=self.metadata)

    async def stats(self, timeout: float = 2.0) -> pb.GetStatsResponse:
        return await self.stub.GetStats(pb.GetStatsRequest(), metadata=self.metadata, timeout=timeout)

    async def serving(self, timeout: float = 2.0) -> bool:
        reply = await self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.channel.close()


def api_error(err: grpc.aio.AioRpcError) -> ApiError:
    """Turn a core error into the HTTP error a client of OpenAI's API expects."""
    code = err.code()
    trailing = dict(err.trailing_metadata() or ())
    param = trailing.get(ERROR_PARAM_KEY) or None
    param = _PARAM_NAMES.get(param, param) if param else None
    error_code = trailing.get(ERROR_CODE_KEY) or None
    details = err.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, details, param=param, code=error_code)
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, details, param=param)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(413, f"the request is too large for the model server: {details}", code="request_too_large")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(503, f"the model server is unavailable: {details}", type="server_error")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ApiError(504, f"the model server timed out: {details}", type="server_error")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(502, "the REST facade could not authenticate to the gRPC core "
                             "(check the facade's core API key)", type="server_error")
    if code == grpc.StatusCode.INTERNAL:
        return ApiError(500, details, type="server_error")
    return ApiError(502, f"the model server answered {code.name}: {details}", type="server_error")
