"""EngineLoop with the real engine (no mocks), on a thread and in a child process (EngineProcess,
the same interface): per-request sinks, rejection, abort, stop, and — with the gRPC core and the
REST facade running in-process around it — what clients see when the engine dies: health turns
NOT_SERVING / 503 and streams end with an error."""
from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon_support import wait_for

from astrai_serve import SamplingParams
from astrai_serve.engine.llm_engine import LLMEngine
from astrai_serve.core.engine_loop import Aborted, EngineDeadError, EngineFailed, EngineLoop, Rejected
from astrai_serve.core.engine_process import EngineProcess

pytestmark = pytest.mark.timeout(120)


class Collector:
    """A sink that records items; `done` is set by the item that ends an n=1 request."""

    def __init__(self) -> None:
        self.items: list = []
        self.done = threading.Event()

    def __call__(self, item) -> None:
        self.items.append(item)
        if isinstance(item, (Rejected, Aborted, EngineFailed)) or item.finished:
            self.done.set()

    def tokens(self) -> list[int]:
        return [t for item in self.items if hasattr(item, "new_token_ids") for t in item.new_token_ids]


# The thread each layout delivers outputs and runs flush hooks on.
DELIVERY_THREAD = {"thread": "astrai-engine-loop", "process": "astrai-engine-reader"}


@pytest.fixture(scope="module", params=sorted(DELIVERY_THREAD))
def loop(request, tiny_model_dir):
    """One per layout for the module (a child process costs seconds); the stop test comes last."""
    if request.param == "thread":
        engine_loop = EngineLoop(LLMEngine(tiny_model_dir, num_pages=128))
    else:
        engine_loop = EngineProcess(tiny_model_dir, {"num_pages": 128})
    engine_loop.kind = request.param
    engine_loop.flushes = []  # thread that ran each flush hook
    engine_loop.add_flush_hook(lambda: engine_loop.flushes.append(threading.current_thread().name))
    engine_loop.start()
    yield engine_loop
    engine_loop.stop(10)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_requests_stream_to_their_own_sinks(loop):
    loop.flushes.clear()
    sinks = {rid: Collector() for rid in ("a", "b", "c")}
    for i, (rid, sink) in enumerate(sinks.items()):
        loop.submit(rid, [5 + i, 6, 7], greedy(4 + i), sink)
    for sink in sinks.values():
        assert sink.done.wait(30)
    for i, (rid, sink) in enumerate(sinks.items()):
        assert all(item.request_id == rid for item in sink.items)
        assert len(sink.tokens()) == 4 + i and sink.items[-1].finish_reason == "length"
    assert wait_for(lambda: loop.num_inflight == 0 and loop.stats().pages_in_use == 0)
    # Flush hooks run on the delivery thread, at least once per step that delivered something.
    assert set(loop.flushes) == {DELIVERY_THREAD[loop.kind]} and len(loop.flushes) >= 4 + 2


def test_rejections_do_not_disturb_running_requests(loop):
    first = Collector()
    loop.submit("same", [5, 6, 7], greedy(40), first)
    duplicate, empty, bad_id = Collector(), Collector(), Collector()
    loop.submit("same", [8, 9], greedy(2), duplicate)
    loop.submit("empty", [], greedy(2), empty)
    loop.submit("bad", [10**7], greedy(2), bad_id)
    for sink in (duplicate, empty, bad_id):
        assert sink.done.wait(30) and isinstance(sink.items[0], Rejected)
        assert isinstance(sink.items[0].error, ValueError) and str(sink.items[0].error)
    assert "same" in str(duplicate.items[0].error)
    loop.abort("same", duplicate)  # the rejected duplicate's abort must not touch the original
    assert first.done.wait(30) and len(first.tokens()) == 40


def test_abort_frees_pages_and_stops_outputs(loop):
    sink = Collector()
    loop.submit("long", [5, 6, 7], greedy(400), sink)
    assert wait_for(lambda: len(sink.items) >= 2, timeout=30)
    loop.abort("long", sink)
    assert wait_for(lambda: loop.num_inflight == 0 and loop.stats().pages_in_use == 0, timeout=10)
    count = len(sink.items)
    extra = Collector()  # one more request, so the loop steps again
    loop.submit("after", [5, 6], greedy(3), extra)
    assert extra.done.wait(30)
    assert len(sink.items) == count and not sink.done.is_set() and len(sink.tokens()) < 400


def test_stop_aborts_in_flight_and_refuses_new_work(loop):
    """The last test of the module's `loop`: it stops it."""
    engine_loop = loop
    sink = Collector()
    engine_loop.submit("running", [5, 6, 7], greedy(400), sink)
    assert wait_for(lambda: len(sink.items) >= 1, timeout=30)
    engine_loop.stop(10)
    assert isinstance(sink.items[-1], Aborted) and not engine_loop.alive
    assert engine_loop.stats().pages_in_use == 0
    with pytest.raises(EngineDeadError):
        engine_loop.submit("late", [5], greedy(1), Collector())


def test_engine_failure_reaches_every_client(tiny_model_dir, tmp_path):
    """Core + facade in-process around a real engine whose step() starts raising mid-stream."""
    from daemon_support import InProcessStack, proto_stubs

    pb2, pb2_grpc = proto_stubs(tmp_path)
    engine = LLMEngine(tiny_model_dir, num_pages=128)
    engine_loop = EngineLoop(engine)
    engine_loop.start()
    stack = InProcessStack(engine_loop)
    try:
        base = stack.url
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        with grpc.insecure_channel(stack.grpc_target) as channel:
            stub = pb2_grpc.GenerationServiceStub(channel)
            call = stub.Generate(pb2.GenerateRequest(text="hi", params=pb2.SamplingParams(
                max_tokens=400, ignore_eos=True)), timeout=60)
            next(call)
            body = {"prompt": "hello", "max_tokens": 400, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as sse:
                lines = sse.iter_lines()
                assert next(lines).startswith("data: ")  # streaming has begun

                def broken_step():
                    raise RuntimeError("simulated device failure")

                engine.step = broken_step  # the real engine, made to fail from now on
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            error = json.loads(rest[-2][6:])["error"]
            assert error["type"] == "server_error" and "simulated device failure" in error["message"]
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.INTERNAL and "simulated device failure" in info.value.details()
            health = health_pb2_grpc.HealthStub(channel)
            assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status
                            == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "dead" in r.json()["reason"]
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert "astrai_engine_alive{model_name=\"tiny\"} 0" in httpx.get(base + "/metrics").text
    finally:
        stack.stop()
        engine_loop.stop(5)


def test_a_grammar_that_fails_after_admission_is_rejected_with_its_reason(tiny_model_dir):
    """structured_compile_wait_s=0: the grammar compiles after add_request returned and then fails;
    the request's sink gets a Rejected naming the problem (a 400 / INVALID_ARGUMENT upstream), not
    an empty abort, and the loop keeps serving."""
    from astrai_serve.engine.structured_spec import StructuredOutput

    engine_loop = EngineLoop(LLMEngine(tiny_model_dir, num_pages=128, structured_compile_wait_s=0.0))
    engine_loop.start()
    try:
        bad, good = Collector(), Collector()
        params = SamplingParams(max_tokens=8, n=2, structured=StructuredOutput(grammar='start: "a" <|no_such_token|>\n'))
        engine_loop.submit("bad", [5, 6, 7], params, bad)
        engine_loop.submit("good", [5, 6, 7], greedy(4), good)
        assert bad.done.wait(30) and good.done.wait(30)
        assert len(bad.items) == 1 and isinstance(bad.items[0], Rejected)
        assert "no_such_token" in str(bad.items[0].error)
        assert len(good.tokens()) == 4
    finally:
        engine_loop.stop(10)
