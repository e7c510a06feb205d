"""The OpenAI-compatible REST facade: a FastAPI app that is only a gRPC client of the core.

It holds no model state — the served name and context length come from the core's ModelInfo,
metrics from its GetStats — so it can run in the daemon's process (`astrai serve`) or beside a
remote core (`astrai gateway`). Request validation and the status codes chosen are documented in
protocol.py (400 for every malformed request, as OpenAI does).

A client that disconnects — mid-stream or while waiting for a whole response — has its gRPC
call cancelled, which aborts the request in the engine and frees its pages.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import time
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from astrai_serve.auth import bearer_matches
from astrai_serve.facade.core_client import CoreClient, api_error
from astrai_serve.facade.disconnect import ClientGone, until_disconnect
from astrai_serve.facade.prometheus import render_prometheus
from astrai_serve.facade.errors import ApiError
from astrai_serve.facade.protocol import ParsedRequest, parse_request
from astrai_serve.facade.responses import Assembler
from astrai_serve.facade import responses_api
from astrai_serve.facade.messages_api import messages_route
from astrai_serve.facade.tokenize_protocol import parse_detokenize, parse_tokenize

log = logging.getLogger("astrai.serve.openai")
T = TypeVar("T")


@dataclass(frozen=True)
class FacadeConfig:
    grpc_target: str                     # HOST:PORT of the gRPC core
    api_key: str | None = None           # HTTP clients must send `Authorization: Bearer <key>` on /v1 routes and /(de)tokenize
    core_api_key: str | None = None      # sent to the core as `authorization` metadata
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413

    def __post_init__(self) -> None:
        if ":" not in self.grpc_target:
            raise ValueError(f"grpc_target must be HOST:PORT, got {self.grpc_target!r}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")


def _call_error(parsed: ParsedRequest, i: int, err: grpc.aio.AioRpcError) -> ApiError:
    """A core error on prompt i's call; in a batch, an error blamed on the prompt names which one.
    One blamed on the output constraint names the body field that set it (response_format, ...)."""
    error = api_error(err)
    if error.param and error.param.split(".")[0] == "structured" and parsed.structured_param:
        error.param = parsed.structured_param
    if len(parsed.requests) > 1 and error.param == parsed.input_param:
        error.param = f"{parsed.input_param}[{i}]"
        error.message = f"{error.param}: {error.message}"
    return error


async def _first(parsed: ParsedRequest, i: int, call: Any) -> Any:
    try:
        return await call.read()
    except grpc.aio.AioRpcError as err:
        raise _call_error(parsed, i, err) from None


async def _merge(parsed: ParsedRequest, calls: list[Any], firsts: list[Any]) -> AsyncIterator[Any]:
    """The responses of a batch's calls as they arrive (each call's first one already read), with
    indices renumbered to the choices': prompt i's sample j is i * n + j. Raises ApiError."""
    def renumbered(i: int, response: Any) -> Any:
        response.index += i * parsed.n
        return response

    if len(calls) == 1:
        # One prompt (every chat request, nearly every completion): plain reads. The batch path's
        # task and asyncio.wait per message would cost the facade CPU on every streamed token.
        response = firsts[0]
        while response is not grpc.aio.EOF:
            yield response
            try:
                response = await calls[0].read()
            except grpc.aio.AioRpcError as err:
                raise _call_error(parsed, 0, err) from None
        return
    reads: dict[asyncio.Future, int] = {}
    try:
        for i, first in enumerate(firsts):
            if first is not grpc.aio.EOF:
                reads[asyncio.ensure_future(calls[i].read())] = i
                yield renumbered(i, first)
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in sorted(done, key=reads.__getitem__):  # in prompt order, for repeatable output
                i = reads.pop(read)
                try:
                    response = read.result()
                except grpc.aio.AioRpcError as err:
                    raise _call_error(parsed, i, err) from None
                if response is not grpc.aio.EOF:
                    reads[asyncio.ensure_future(calls[i].read())] = i
                    yield renumbered(i, response)
    finally:
        for read in reads:  # the consumer stopped (disconnect, error): nothing more is read
            read.cancel()
            if read.done() and not read.cancelled():
                read.exception()  # retrieved, so asyncio does not log it as never retrieved


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def create_app(config: FacadeConfig) -> FastAPI:
    state: dict[str, Any] = {}   # the core client, the start time, the last /stats mark

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["core"] = CoreClient(config.grpc_target, config.core_api_key)
        state["started"] = time.monotonic()
        try:
            yield
        finally:
            await state["core"].close()

    app = FastAPI(title="astrai OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def check_auth(request: Request) -> None:
        if config.api_key and not bearer_matches(request.headers.get("authorization"), config.api_key):
            present = "authorization" in request.headers
            raise ApiError(401, ("Incorrect API key provided" if present else "Missing API key") +
                           ": send 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {config.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the request body exceeds the limit of {config.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise ApiError(400, "the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply to parse") from None

    async def ask_core(call: Awaitable[T]) -> T:
        """A unary call to the core; its errors become OpenAI-shaped HTTP errors."""
        try:
            return await call
        except grpc.aio.AioRpcError as err:
            raise api_error(err) from None

    async def model_info() -> Any:
        return await ask_core(state["core"].model_info())

    async def generate(request: Request, kind: str) -> Response:
        check_auth(request)
        body = await read_json(request)
        info = await model_info()
        parsed = parse_request(kind, body, info.name, info.context_length, info.tool_call_parser)
        assembler = Assembler(parsed, info.name)
        calls = [state["core"].generate(r) for r in parsed.requests]  # a batch of prompts: one call each
        streaming = False
        try:
            # Errors surface at each call's first read, before any byte is sent: a prompt of a batch
            # that the core refuses is a 400 naming it, not an error in the middle of a stream.
            firsts = await until_disconnect(request, asyncio.gather(
                *(_first(parsed, i, call) for i, call in enumerate(calls))))
            if parsed.stream:
                streaming = True  # from here stream() owns the calls
                return StreamingResponse(stream(parsed, assembler, calls, firsts), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            await until_disconnect(request, collect(parsed, assembler, calls, firsts))
            return JSONResponse(assembler.result())
        except ClientGone:
            return Response(status_code=499)
        finally:
            if not streaming:  # a no-op for finished calls; otherwise it aborts the request in the core
                for call in calls:
                    call.cancel()

    async def collect(parsed: ParsedRequest, assembler: Assembler, calls: list[Any], firsts: list[Any]) -> None:
        async with aclosing(_merge(parsed, calls, firsts)) as responses:
            async for response in responses:
                assembler.add(response)

    async def stream(parsed: ParsedRequest, assembler: Assembler, calls: list[Any], firsts: list[Any]
                     ) -> AsyncIterator[str]:
        try:
            async with aclosing(_merge(parsed, calls, firsts)) as responses:
                async for response in responses:
                    for chunk in assembler.chunks(response):
                        yield _sse(chunk)
            if parsed.include_usage:
                yield _sse(assembler.usage_chunk())
        except ApiError as err:  # after the 200 went out, errors travel in the stream
            yield _sse(err.body())
        finally:
            for call in calls:  # a no-op when finished; on disconnect or error it aborts the request in the core
                call.cancel()
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/responses")
    async def responses_create(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request)
        return await responses_api.create(request, body, state["core"], await model_info())

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:   # Anthropic's Messages API: its own auth and error shape
        return await messages_route(request, state["core"], read_json, config.api_key)

    # vLLM's paths: at the root, not under /v1 (they are not OpenAI's)
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        check_auth(request)
        body = await read_json(request)
        info = await model_info()
        reply = await ask_core(state["core"].tokenize(parse_tokenize(body, info.name)))
        return {"count": reply.count, "max_model_len": reply.max_len, "tokens": list(reply.token_ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        check_auth(request)
        body = await read_json(request)
        info = await model_info()
        reply = await ask_core(state["core"].detokenize(parse_detokenize(body, info.name, info.vocab_size)))
        return {"prompt": reply.text}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        info = await model_info()
        return {"object": "list", "data": [_model_card(info)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        info = await model_info()
        if model_id != info.name:
            raise ApiError(404, f"The model '{model_id}' does not exist; this server serves '{info.name}'",
                           param="model", code="model_not_found")
        return _model_card(info)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": package_version()})

    @app.get("/stats")
    async def stats_json() -> Response:
        try:
            stats = await state["core"].stats()
        except grpc.aio.AioRpcError as err:
            return JSONResponse({"status": "unavailable", "reason": f"gRPC core: {err.code().name}"}, status_code=503)
        now = time.monotonic()
        since, before = state.setdefault("stats_mark", (state["started"], 0))
        state["stats_mark"] = (now, stats.generation_tokens_total)
        return JSONResponse(stats_body(stats, (stats.generation_tokens_total - before) / max(now - since, 1e-9)))

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:       # vLLM's (and SageMaker's) liveness route: /health's answer
        return await health()

    @app.get("/health")
    async def health() -> Response:
        try:
            stats = await state["core"].stats()
        except grpc.aio.AioRpcError as err:
            return JSONResponse({"status": "unavailable", "reason": f"gRPC core: {err.code().name}"}, status_code=503)
        if not stats.engine_alive:
            return JSONResponse({"status": "unhealthy", "reason": "the engine loop is dead"}, status_code=503)
        if not stats.accepting:
            return JSONResponse({"status": "draining", "reason": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            stats = await state["core"].stats()
            info = await state["core"].model_info()
        except grpc.aio.AioRpcError as err:
            return PlainTextResponse(f"# gRPC core unavailable: {err.code().name}\n", status_code=503)
        return PlainTextResponse(render_prometheus(stats, info.name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def package_version() -> str:
    try:
        return importlib.metadata.version("astrai")
    except importlib.metadata.PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown"


def stats_body(stats: Any, tokens_per_s: float) -> dict[str, Any]:
    """/stats: the engine's state as plain JSON (what /metrics says for Prometheus, for a person
    or a script); tokens/s is the generation rate since the previous /stats call (or since start)."""
    return {"requests": {"running": stats.num_requests_running, "waiting": stats.num_requests_waiting},
            "kv_pages": {"total": stats.kv_pages_total, "in_use": stats.kv_pages_in_use,
                         "cached": stats.kv_pages_cached,
                         "free": stats.kv_pages_total - stats.kv_pages_in_use - stats.kv_pages_cached},
            "prefix_cache_hit_rate": stats.prefix_cache_hit_tokens_total / max(stats.prompt_tokens_total, 1),
            "tokens": {"prompt_total": stats.prompt_tokens_total, "generation_total": stats.generation_tokens_total,
                       "prefix_cache_hit_total": stats.prefix_cache_hit_tokens_total},
            "generation_tokens_per_s": tokens_per_s,
            "preemptions_total": stats.num_preemptions_total,
            "requests_finished_total": dict(stats.requests_finished_total),
            "engine_alive": stats.engine_alive, "accepting": stats.accepting}


def _model_card(info: Any) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": 0, "owned_by": "astrai",
            "max_model_len": info.context_length}
