"""The optional API key, checked the same way on both protocols.

HTTP clients send `Authorization: Bearer KEY`; gRPC clients send the metadata
`authorization: Bearer KEY`. The key comes from `--api-key` or the ASTRAI_API_KEY environment
variable (read once at startup, never in a request path). Health checks and gRPC reflection stay
open so load balancers and grpcurl work without the key; they reveal nothing but liveness and
the public schema.
"""
from __future__ import annotations

import hmac
import os
from typing import Any, Awaitable, Callable

import grpc

API_KEY_ENV = "ASTRAI_API_KEY"
# gRPC methods anyone may call (prefixes of the full method name).
OPEN_GRPC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def resolve_api_key(cli_value: str | None) -> str | None:
    """--api-key wins over the environment; an empty value means no key."""
    key = cli_value if cli_value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def bearer_matches(header_value: str | None, api_key: str) -> bool:
    """True when header_value is `Bearer <api_key>` (scheme case-insensitive, constant-time compare)."""
    if not header_value:
        return False
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny, **kwargs)


class GrpcApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <key>` metadata, except OPEN_GRPC_PREFIXES."""

    def __init__(self, api_key: str):
        self._api_key = api_key

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_GRPC_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization")
        if bearer_matches(header, self._api_key):
            return handler
        reason = "missing" if not header else "wrong"
        return _denied(handler, f"{reason} API key: send metadata 'authorization: Bearer <key>'")
