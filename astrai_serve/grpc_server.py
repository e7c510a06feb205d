"""The gRPC core: astrai.v1.GenerationService over an EngineLoop, plus health and reflection.

Requests are checked and tokenized here, on the asyncio side (in a worker thread, so a huge
prompt blocks neither the event loop nor the engine), and reach the engine as token ids. A bad
request is answered INVALID_ARGUMENT with a message naming the value, and trailing metadata
`astrai-error-param` (the offending field) and, for an over-long prompt,
`astrai-error-code: context_length_exceeded`, which the REST facade turns into OpenAI's error shape.

Each Generate call owns an asyncio.Queue fed by the engine loop through a StepBatcher. When the client cancels,
the handler is cancelled and its `finally` aborts the request, freeing its pages at once.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from astrai_serve.auth import GrpcApiKeyInterceptor
from astrai_serve.engine_loop import Aborted, EngineDeadError, EngineFailed, EngineLoop, Rejected
from astrai_serve.metrics import ServerMetrics
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto import generate_pb2_grpc as pb_grpc
from astrai_serve.request_checks import InvalidRequest, RequestChecker

log = logging.getLogger("astrai.serve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
ERROR_PARAM_KEY = "astrai-error-param"
ERROR_CODE_KEY = "astrai-error-code"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # above the facade's 4 MiB body limit, so HTTP sees 413 first


class StepBatcher:
    """Sinks for Generate calls that deliver a whole engine step at once to this event loop.

    The sinks and flush() run on the engine-loop thread only (so the list needs no lock); the
    event loop wakes once per step, not once per output."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def sink(self, queue: asyncio.Queue) -> Any:
        return lambda item: self._pending.append((queue, item))

    def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._loop.call_soon_threadsafe(self._put_all, batch)

    @staticmethod
    def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
        for queue, item in batch:
            queue.put_nowait(item)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Create inside the running event loop that will serve it (it batches deliveries to it)."""

    def __init__(self, engine_loop: EngineLoop, model_name: str, metrics: ServerMetrics | None = None):
        self.loop = engine_loop
        self.model_name = model_name
        self.metrics = metrics or ServerMetrics()
        engine = engine_loop.engine
        self.tokenizer = engine.tokenizer
        # The engine's limit: the model's context, or less when the KV pool cannot hold that much.
        self.max_len = int(getattr(engine, "max_seq_len", engine.model_config.max_len))
        self.vocab_size = int(engine.model_config.vocab_size)
        self.checker = RequestChecker(self.tokenizer, self.max_len, self.vocab_size)
        self.batcher = StepBatcher(asyncio.get_running_loop())
        engine_loop.add_flush_hook(self.batcher.flush)
        self.accepting = True  # False once shutdown began: new Generate calls get UNAVAILABLE
        self.active = 0        # Generate calls in progress (streams not yet closed)
        self._token_text: dict[int, str] = {}

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                     param: str = "", error_code: str = "") -> None:
        trailing = ((ERROR_PARAM_KEY, param), (ERROR_CODE_KEY, error_code))
        await context.abort(code, message, trailing_metadata=trailing)

    def _token(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def _logprobs(self, entries: Any) -> list[pb.TokenLogprob]:
        return [pb.TokenLogprob(token_id=tid, token=self._token(tid), logprob=lp,
                                top_logprobs=[pb.TopLogprob(token_id=t, token=self._token(t), logprob=l)
                                              for t, l in (top or ())])
                for tid, lp, top in entries or ()]

    # ---- rpcs ------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        start = time.perf_counter()
        if not self.accepting:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down and admits no new requests")
        try:
            ids, input_field = await asyncio.to_thread(self.checker.prompt_ids, request)
            params = self.checker.sampling_params(request.params, len(ids), input_field)
        except InvalidRequest as exc:
            self.metrics.count_finished("rejected")
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param, exc.code)
        request_id = request.request_id or uuid.uuid4().hex
        n = max(1, int(getattr(params, "n", 1) or 1))
        queue: asyncio.Queue = asyncio.Queue()
        sink = self.batcher.sink(queue)
        try:
            self.loop.submit(request_id, ids, params, sink)
        except EngineDeadError as exc:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}")
        self.active += 1
        first_token: dict[int, float] = {}
        generated: dict[int, int] = {}   # completion tokens so far, per sample
        finished: set[int] = set()
        prompt_tokens, cached_tokens = len(ids), 0
        done = False
        try:
            while not done:
                item = await queue.get()
                if isinstance(item, Rejected):
                    done = True
                    self.metrics.count_finished("rejected")
                    await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(item.error), input_field)
                if isinstance(item, EngineFailed):
                    done = True
                    self.metrics.count_finished("error")
                    await self._abort(context, grpc.StatusCode.INTERNAL, f"the engine failed: {item.message}")
                if isinstance(item, Aborted):  # shutdown: close every open sample with "abort"
                    done = True
                    open_samples = [i for i in range(n) if i not in finished]
                    for k, i in enumerate(open_samples):
                        self.metrics.count_finished("abort")
                        last = k == len(open_samples) - 1
                        usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(generated.values()),
                                         cached_tokens=cached_tokens) if last else None
                        yield pb.GenerateResponse(request_id=request_id, index=i, finish_reason="abort", usage=usage)
                    break
                now = time.perf_counter()
                out = item
                if out.new_token_ids and out.index not in first_token:
                    first_token[out.index] = now
                    if len(first_token) == 1:
                        self.metrics.ttft.observe(now - start)
                prompt_tokens = int(out.prompt_tokens or prompt_tokens)
                cached_tokens = max(cached_tokens, int(out.cached_tokens or 0))
                response = pb.GenerateResponse(request_id=request_id, index=out.index,
                                               token_ids=out.new_token_ids, text=out.new_text or "",
                                               logprobs=self._logprobs(out.logprobs))
                generated[out.index] = int(out.completion_tokens)
                if out.finished:
                    finished.add(out.index)
                    response.finish_reason = out.finish_reason or "stop"
                    self.metrics.count_finished(response.finish_reason)
                    if out.completion_tokens > 1 and out.index in first_token:
                        self.metrics.tpot.observe((now - first_token[out.index]) / (out.completion_tokens - 1))
                    if len(finished) == n:
                        done = True
                        response.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                                                         completion_tokens=sum(generated.values())))
                        self.metrics.e2e.observe(now - start)
                yield response
        finally:
            self.active -= 1
            if not done:  # cancelled by the client (or the stream broke): free the pages now
                self.loop.abort(request_id, sink)
                self.metrics.count_finished("cancelled")

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        kind = request.WhichOneof("input")
        try:
            if kind == "text":
                ids = await asyncio.to_thread(self.tokenizer.encode, request.text)
            elif kind == "messages":
                msgs = self.checker.messages(request.messages, kind)
                ids = await asyncio.to_thread(self.tokenizer.apply_chat_template, msgs,
                                              add_generation_prompt=request.add_generation_prompt, tokenize=True)
            else:
                raise InvalidRequest("the request has no input: set text or messages", "input")
        except InvalidRequest as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param)
        return pb.TokenizeResponse(token_ids=list(ids), count=len(ids), max_len=self.max_len)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        tok = self.tokenizer
        return pb.ModelInfoResponse(name=self.model_name, context_length=self.max_len, vocab_size=self.vocab_size,
                                    eos_id=int(tok.eos_id), stop_token_ids=sorted(int(t) for t in tok.stop_ids),
                                    tokenizer_hash=str(getattr(tok, "hash", "")))

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        s = self.loop.stats()
        return pb.GetStatsResponse(
            engine_alive=self.loop.alive, accepting=self.accepting,
            kv_pages_total=s.pages_total, kv_pages_in_use=s.pages_in_use, kv_pages_cached=s.pages_cached,
            num_requests_running=s.num_running, num_requests_waiting=s.num_waiting,
            prefix_cache_hit_tokens_total=s.prefix_cache_hit_tokens_total,
            prompt_tokens_total=s.prompt_tokens_total, generation_tokens_total=s.generation_tokens_total,
            num_preemptions_total=s.num_preemptions_total,
            histograms=self.metrics.histograms(), requests_finished_total=self.metrics.finished())


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class CoreServer:
    """The grpc.aio server with our service, health and reflection. Create inside a running loop."""

    def __init__(self, servicer: GenerationServicer, host: str, port: int, api_key: str | None):
        self.servicer = servicer
        interceptors = [GrpcApiKeyInterceptor(api_key)] if api_key else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),  # otherwise a second daemon silently shares the port
        ])
        pb_grpc.add_GenerationServiceServicer_to_server(servicer, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        try:
            self.port = self.server.add_insecure_port(_address(host, port))
        except RuntimeError as exc:
            raise OSError(f"cannot bind the gRPC port {_address(host, port)}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {_address(host, port)} (in use or not allowed)")
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._set_serving(True)
        self._watch = asyncio.create_task(self._watch_engine())

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _watch_engine(self) -> None:
        # Health follows the engine loop: once it dies, probes see NOT_SERVING.
        while self.servicer.loop.alive:
            await asyncio.sleep(0.25)
        if self.servicer.accepting:
            log.error("the engine loop died (%s); health is now NOT_SERVING", self.servicer.loop.error)
        await self._set_serving(False)

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to timeout for open Generate calls. True if all finished."""
        self.servicer.accepting = False
        await self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout
        while self.servicer.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.servicer.active == 0

    async def stop(self, grace: float = 2.0) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.server.stop(grace)
