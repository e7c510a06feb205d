"""The gRPC core: astrai.v1.GenerationService over an engine handle (an EngineLoop, the engine on a
thread here, or an EngineProcess, the engine in a child process), plus health and reflection.

Requests are checked and tokenized here, on the asyncio side (in a worker thread, so a huge
prompt blocks neither the event loop nor the engine), and reach the engine as token ids. A bad
request is answered INVALID_ARGUMENT with a message naming the value, and trailing metadata
`astrai-error-param` (the offending field) and, for an over-long prompt,
`astrai-error-code: context_length_exceeded`, which the REST facade turns into OpenAI's error shape.

Each Generate call owns an asyncio.Queue fed by the engine loop through a StepBatcher (one wake-up
of the event loop per engine step, not per output). Whatever has queued up when the call looks
again goes out as one message per sample: a stream that lags (a slow client, or an event loop
busy with many streams) sends its backlog in one message instead of one per token, so the cost of
delivery falls as the load rises instead of stealing the engine's time (which, with the engine on a
thread of this process, shares one GIL with it).
When the client cancels, the handler is cancelled and its `finally` aborts the request, freeing
its pages at once.

A sample's prompt log-probs go out in parts of at most PROMPT_LOGPROBS_PER_MESSAGE positions, in
order, the last part in the sample's first message with tokens (or its finish): one message for a
long prompt with many alternatives would outgrow gRPC's message limit.
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
from grpc_reflection.v1alpha import reflection, reflection_pb2

from astrai_serve.auth import GrpcApiKeyInterceptor
from astrai_serve.core.engine_loop import MARKERS, EngineDeadError, EngineFailed, EngineHandle, Rejected, num_samples
from astrai_serve.core.metrics import ServerMetrics
from astrai_serve.proto import generate_pb2 as pb
from astrai_serve.proto import generate_pb2_grpc as pb_grpc
from astrai_serve.proto.contract import ERROR_CODE_KEY, ERROR_PARAM_KEY, MAX_MESSAGE_BYTES
from astrai_serve.core.request_checks import InvalidRequest, RequestChecker, resolve_tool_call_parser

log = logging.getLogger("astrai.serve.grpc")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# A prompt position costs ~25 B plus, per alternative (at most 20), ~12 B and its token's text:
# ~0.7 KB at 20 alternatives of 20-byte texts (long for BPE), so a part stays near 3 MiB, far
# below MAX_MESSAGE_BYTES; a 32k-token prompt still takes only 8 messages.
PROMPT_LOGPROBS_PER_MESSAGE = 4096


class StepBatcher:
    """Sinks for Generate calls that deliver a whole engine step at once to this event loop.

    The sinks and flush() run on the engine loop's delivery thread only (the loop thread, or an
    EngineProcess's reader thread), so the list needs no lock; the event loop wakes once per step,
    not once per output."""

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

    def __init__(self, engine_loop: EngineHandle, model_name: str, metrics: ServerMetrics | None = None,
                 prompt_logprobs_per_message: int = PROMPT_LOGPROBS_PER_MESSAGE, tool_call_parser: str = "auto",
                 sampling_defaults: dict[str, Any] | None = None):
        if prompt_logprobs_per_message < 1:
            raise ValueError(f"prompt_logprobs_per_message must be >= 1, got {prompt_logprobs_per_message}")
        self.loop = engine_loop
        self.model_name = model_name
        self.metrics = metrics or ServerMetrics()
        self.tokenizer = engine_loop.tokenizer
        self.max_len = engine_loop.max_seq_len  # the model's context, or less when the KV pool is smaller
        self.vocab_size = engine_loop.vocab_size
        self.tool_call_parser = resolve_tool_call_parser(tool_call_parser, self.tokenizer)  # "hermes" or ""
        self.checker = RequestChecker(self.tokenizer, self.max_len, self.vocab_size, self.tool_call_parser,
                                      sampling_defaults)
        self.batcher = StepBatcher(asyncio.get_running_loop())
        engine_loop.add_flush_hook(self.batcher.flush)
        self.accepting = True  # False once shutdown began: new Generate calls get UNAVAILABLE
        self.active = 0        # Generate calls in progress (streams not yet closed)
        self._token_text: dict[int, str] = {}
        self.prompt_logprobs_per_message = prompt_logprobs_per_message  # prompt positions per message

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

    def add_prompt_logprobs(self, field: Any, entries: list[Any], first_token: int, start: int, stop: int) -> None:
        """Engine prompt log-probs [start, stop) (None for the first token, then (id, logprob, top))
        -> PromptLogprob messages added to `field` (built in place: copying thousands of them costs
        as much again)."""
        tok = self._token
        if start == 0:
            field.add(token_id=first_token, token=tok(first_token))
            start = 1
        for tid, lp, top in entries[start:stop]:
            tops = field.add(token_id=tid, token=tok(tid), logprob=lp).top_logprobs
            for t, l in top:
                tops.add(token_id=t, token=tok(t), logprob=l)

    def logprob_messages(self, entries: Any) -> list[pb.TokenLogprob]:
        """Engine logprobs (id, logprob, top) -> TokenLogprob messages, token texts cached."""
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
            params = self.checker.sampling_params(request.params, len(ids), input_field, request)
        except InvalidRequest as exc:
            self.metrics.count_finished("rejected")
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param, exc.code)
        # The prompt as given (special tokens included), off the event loop: it may be long.
        echo = (await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=False)
                if request.echo_prompt else None)
        request_id = request.request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        sink = self.batcher.sink(queue)
        try:
            self.loop.submit(request_id, ids, params, sink)
        except EngineDeadError as exc:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}")
        self.active += 1
        stream = _Stream(self, request_id, num_samples(params), ids, start, echo,
                         params if request.params.include_stop_str_in_output and params.stop else None)
        scoring = params.prompt_logprobs is not None
        try:
            while not stream.done:
                # Everything queued since we last looked: more than one step's outputs when we lag
                # (the event loop fell behind the engine, or our last write waited on a slow client).
                # They go out as one message per sample, so a backlog costs one send, not one per token.
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                # A marker (Rejected, Aborted, EngineFailed) is always a request's last item.
                marker = items.pop() if isinstance(items[-1], MARKERS) else None
                if scoring and any(out.prompt_logprobs is not None for out in items):
                    # a long prompt's messages take a while to build (0.2 s for 16k tokens with 5
                    # alternatives each on a slow core): not on the event loop, which serves every stream
                    await asyncio.to_thread(stream.build_prompt_logprobs, items)
                for response in stream.responses(items):
                    yield response
                if marker is None:
                    continue
                stream.done = True
                if isinstance(marker, Rejected):
                    self.metrics.count_finished("rejected")
                    await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(marker.error),
                                      _rejected_param(params, str(marker.error), input_field))
                elif isinstance(marker, EngineFailed):
                    self.metrics.count_finished("error")
                    await self._abort(context, grpc.StatusCode.INTERNAL, f"the engine failed: {marker.message}")
                else:  # Aborted (shutdown): close every open sample with "abort"
                    for response in stream.abort_responses():
                        yield response
        finally:
            self.active -= 1
            if not stream.done:  # cancelled by the client (or the stream broke): free the pages now
                self.loop.abort(request_id, sink)
                self.metrics.count_finished("cancelled")

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:   # off the event loop, like Generate's prompts: a text may be long
            ids = await asyncio.to_thread(self.checker.tokenize, request)
        except InvalidRequest as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_len=self.max_len)

    async def Detokenize(self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
                         ) -> pb.DetokenizeResponse:
        try:
            ids = self.checker.token_ids(request.token_ids, "token_ids")
        except InvalidRequest as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.param)
        # special tokens kept, as echo_prompt decodes a prompt (and as vLLM's /detokenize does)
        text = await asyncio.to_thread(self.tokenizer.decode, ids, skip_special_tokens=False)
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        tok = self.tokenizer
        return pb.ModelInfoResponse(name=self.model_name, context_length=self.max_len, vocab_size=self.vocab_size,
                                    eos_id=int(tok.eos_id), stop_token_ids=sorted(int(t) for t in tok.stop_ids),
                                    tokenizer_hash=str(getattr(tok, "hash", "")),
                                    tool_call_parser=self.tool_call_parser)

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


def _rejected_param(params: Any, message: str, input_field: str) -> str:
    """The field an engine rejection names: its output constraint when that is what the engine
    could not compile, else the prompt."""
    structured = getattr(params, "structured", None)
    if structured is None or not any(w in message.lower() for w in ("structured", "grammar", "schema", "regex")):
        return input_field
    return "tool_choice" if structured.kind == "tool_calls" else "structured"


class _Stream:
    """One Generate call's bookkeeping: turns engine outputs into GenerateResponses, one message
    per sample per batch of outputs, and keeps usage and the latency metrics.

    keep_stop (include_stop_str_in_output, the request's params): a sample that a stop string
    ended gets that string back at the end of its text. The engine cuts the text before it; which
    one matched is read off the sample's tokens, decoded past where the text was cut."""

    def __init__(self, servicer: GenerationServicer, request_id: str, n: int, prompt: list[int], start: float,
                 echo: str | None = None, keep_stop: Any = None):
        self.servicer, self.metrics = servicer, servicer.metrics
        self.request_id, self.n, self.start = request_id, n, start
        self.prompt_tokens, self.cached_tokens = len(prompt), 0
        self.first_prompt_token = prompt[0]      # the one prompt token without a log-prob
        self.echo = echo                         # the prompt's text, for each sample's first message
        self.echoed: set[int] = set()
        self.first_messages: dict[int, pb.GenerateResponse] = {}   # sample -> its first message (prompt log-probs in)
        self.prompt_parts: dict[int, list[pb.GenerateResponse]] = {}  # sample -> the parts that go before it
        self.first_token: dict[int, float] = {}  # sample -> time its first token was delivered
        self.generated: dict[int, int] = {}      # sample -> completion tokens so far
        self.finished: set[int] = set()
        self.done = False                        # the last message went out (or a marker ended the call)
        self.keep_stop = keep_stop               # params, when the stop string stays in the text
        self.sample_ids: dict[int, list[int]] = {}   # with keep_stop: sample -> its tokens so far
        self.sample_text: dict[int, list[str]] = {}  # with keep_stop: sample -> its text so far

    def build_prompt_logprobs(self, outputs: list[Any]) -> None:
        """For each sample whose output carries the prompt log-probs: the messages of all parts but
        the last, and its first message started with the last part in; `responses` fills in the rest."""
        per = self.servicer.prompt_logprobs_per_message
        for out in outputs:
            entries = out.prompt_logprobs
            if entries is None:
                continue
            starts = range(0, len(entries), per)
            parts = [pb.GenerateResponse(request_id=self.request_id, index=out.index) for _ in starts]
            for message, start in zip(parts, starts):
                self.servicer.add_prompt_logprobs(message.prompt_logprobs, entries, self.first_prompt_token,
                                                  start, start + per)
            self.first_messages[out.index] = parts.pop()
            if parts:
                self.prompt_parts[out.index] = parts

    def responses(self, outputs: list[Any]) -> list[pb.GenerateResponse]:
        """Outputs (in engine order) -> one message per sample: the token ids, text and logprobs of
        that sample's outputs concatenated, finish_reason from its last. Samples are ordered by their
        last output, so the message that completes the request (with usage) is the last one."""
        if not outputs:
            return []
        groups: dict[int, list[Any]] = {}
        for out in outputs:
            groups.setdefault(out.index, []).append(out)
        if len(groups) > 1:
            last_seen = {out.index: k for k, out in enumerate(outputs)}
            groups = {i: groups[i] for i in sorted(groups, key=last_seen.__getitem__)}
        now = time.perf_counter()
        if not self.prompt_parts:
            return [self._response(index, group, now) for index, group in groups.items()]
        responses = []
        for index, group in groups.items():
            responses.extend(self.prompt_parts.pop(index, ()))   # before the part in its first message
            responses.append(self._response(index, group, now))
        return responses

    def _response(self, index: int, group: list[Any], now: float) -> pb.GenerateResponse:
        last = group[-1]
        if len(group) == 1:  # no backlog: the common case, nothing to concatenate
            token_ids, text, logprobs = last.new_token_ids, last.new_text or "", last.logprobs
        else:
            token_ids = [t for out in group for t in out.new_token_ids]
            text = "".join(out.new_text or "" for out in group)
            logprobs = None if last.logprobs is None else [lp for out in group for lp in out.logprobs or ()]
        if token_ids and index not in self.first_token:
            self.first_token[index] = now
            if len(self.first_token) == 1:
                self.metrics.ttft.observe(now - self.start)
        self.prompt_tokens = int(last.prompt_tokens or self.prompt_tokens)
        self.cached_tokens = max(self.cached_tokens, int(last.cached_tokens or 0))
        self.generated[index] = int(last.completion_tokens)
        first = self.first_messages.pop(index, None) if self.first_messages else None
        if first is None:
            response = pb.GenerateResponse(request_id=self.request_id, index=index, token_ids=token_ids, text=text)
        else:
            response = first
            response.request_id, response.index, response.text = self.request_id, index, text
            response.token_ids.extend(token_ids)
        if logprobs:  # only when the request asked for them: no conversion work otherwise
            response.logprobs.extend(self.servicer.logprob_messages(logprobs))
        if self.echo is not None and index not in self.echoed:
            self.echoed.add(index)
            response.prompt_text = self.echo
        if self.keep_stop is not None:
            self.sample_ids.setdefault(index, []).extend(token_ids)
            self.sample_text.setdefault(index, []).append(text)
        if last.finished:
            self.finished.add(index)
            response.finish_reason = last.finish_reason or "stop"
            if self.keep_stop is not None and response.finish_reason == "stop":
                response.text += self._stop_string(index)
            self.metrics.count_finished(response.finish_reason)
            if last.completion_tokens > 1 and index in self.first_token:
                self.metrics.tpot.observe((now - self.first_token[index]) / (last.completion_tokens - 1))
            if len(self.finished) == self.n:
                self.done = True
                response.usage.CopyFrom(self._usage())
                self.metrics.e2e.observe(now - self.start)
        return response

    def _stop_string(self, index: int) -> str:
        """The stop string that ended sample `index` ("" when a stop token did)."""
        params, ids = self.keep_stop, self.sample_ids.get(index, [])
        if not ids or ids[-1] in params.stop_token_ids or ids[-1] in self.servicer.tokenizer.stop_ids:
            return ""
        text = "".join(self.sample_text.get(index, []))
        full = self.servicer.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        found = [(full.find(s, len(text)), s) for s in params.stop if s in full[len(text):]]
        exact = [s for s in params.stop if full.startswith(s, len(text))]
        return max(exact, key=len) if exact else min(found)[1] if found else ""

    def abort_responses(self) -> list[pb.GenerateResponse]:
        """Shutdown aborted the request: end every open sample with "abort", usage on the last."""
        open_samples = [i for i in range(self.n) if i not in self.finished]
        responses = []
        for k, i in enumerate(open_samples):
            self.metrics.count_finished("abort")
            usage = self._usage() if k == len(open_samples) - 1 else None
            responses.append(pb.GenerateResponse(request_id=self.request_id, index=i, finish_reason="abort", usage=usage))
        return responses

    def _usage(self) -> pb.Usage:
        return pb.Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                        completion_tokens=sum(self.generated.values()))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection under both of its names. grpcio-reflection serves only v1alpha; clients
    such as grpcurl ask v1 first (and some only v1). The two protocols' messages are the same
    fields under another package name, identical on the wire, so v1's path gets the same servicer
    with v1alpha's (de)serialisers. v1 is not in the listed services: its descriptor is not in
    this process's pool, so a client could not describe it."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    handlers = {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}
    for name in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


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
        _add_reflection(self.server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                      reflection.SERVICE_NAME))
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
