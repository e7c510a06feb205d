"""`astrai serve`'s process layout: the REST facade runs as a child process (`astrai gateway`)
that serves on the port the daemon bound, drains with it, and never outlives it; the daemon in
turn does not run on half up when its facade dies. The engine runs in another child process:
its death fails the open streams and turns health NOT_SERVING while the daemon stays up, and it
never outlives the daemon either. `--http-in-process --engine-in-process` keep both on threads,
and both layouts generate the same tokens."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemon_support import proto_stubs, start_serve, wait_for

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan may wait a while for a container's init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def child(daemon, word: bytes) -> int:
    """The daemon's one child process whose command line has `word`."""
    kids = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children(daemon.proc.pid)}
    found = [pid for pid, argv in kids.items() if word in argv]
    assert len(found) == 1, f"expected one {word.decode()} child, got {kids}"
    return found[0]


def facade_pid(daemon) -> int:
    pid = child(daemon, b"gateway")
    assert b"--stop-on-stdin-eof" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return pid


def engine_pid(daemon) -> int:
    return child(daemon, b"astrai_serve.core.engine_process")


PROMPT = [5, 6, 7, 8, 9]
GREEDY = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    return proto_stubs(tmp_path_factory.mktemp("grpc_stubs"))


@pytest.fixture(scope="module")
def greedy_ids(tiny_model_dir):
    """PROMPT's greedy continuation by the engine itself, in this process: what every layout must send."""
    from astrai_serve import LLMEngine, SamplingParams

    engine = LLMEngine(tiny_model_dir, num_pages=512)
    engine.add_request("reference", PROMPT, SamplingParams(**GREEDY))
    ids = []
    while engine.has_unfinished_requests():
        ids += [t for out in engine.step() for t in out.new_token_ids]
    assert len(ids) == GREEDY["max_tokens"]
    return ids


def long_stream(stubs, channel):
    """A 480-token Generate stream, already running (its first response read)."""
    pb2, pb2_grpc = stubs
    call = pb2_grpc.GenerationServiceStub(channel).Generate(pb2.GenerateRequest(
        text="Out, out, brief candle", params=pb2.SamplingParams(max_tokens=480, ignore_eos=True)), timeout=60)
    next(call)
    return call


def assert_engine_down(stubs, channel, why: str) -> None:
    """Health NOT_SERVING, the daemon still answering, new work refused with UNAVAILABLE naming why."""
    pb2, pb2_grpc = stubs
    health = health_pb2_grpc.HealthStub(channel)
    assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest()).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=10)
    stub = pb2_grpc.GenerationServiceStub(channel)
    assert not stub.GetStats(pb2.GetStatsRequest()).engine_alive
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb2.GenerateRequest(text="hi", params=pb2.SamplingParams(max_tokens=2)), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == f"the engine is not running: {why}"


def generate_greedy(stubs, channel) -> list[int]:
    pb2, pb2_grpc = stubs
    request = pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=PROMPT), params=pb2.SamplingParams(**GREEDY))
    return [t for r in pb2_grpc.GenerationServiceStub(channel).Generate(request, timeout=60) for t in r.token_ids]


def test_sigterm_drains_http_streams_then_stops_the_facade(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--shutdown-timeout", "30", "--api-key", "k")
    try:
        child, engine = facade_pid(daemon), engine_pid(daemon)
        assert "k" not in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"), "the key must not be in argv"
        base, auth = daemon.ready["http"], {"Authorization": "Bearer k"}
        assert httpx.get(base + "/health").json() == {"status": "ok"}
        body = {"prompt": "Tomorrow, and tomorrow", "max_tokens": 480, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=auth, timeout=60) as sse:
            lines = sse.iter_lines()
            assert next(lines).startswith("data: ")  # running
            daemon.proc.send_signal(signal.SIGTERM)
            r = wait_for(lambda: (h := httpx.get(base + "/health")).status_code == 503 and h, timeout=5, interval=0.01)
            assert r and r.json()["status"] == "draining"
            late = httpx.post(base + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, headers=auth)
            assert late.status_code == 503
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length", "admitted streams finish"
        assert daemon.proc.wait(30) == 0, daemon.stderr()
        assert wait_for(lambda: not running(child), timeout=10), "the facade process outlived the daemon"
        assert not running(engine), "the engine process outlived the daemon"
    finally:
        daemon.kill()


def test_children_exit_when_the_daemon_is_killed(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log")
    kids = {"facade": facade_pid(daemon), "engine": engine_pid(daemon)}
    daemon.kill()  # SIGKILL: no shutdown code runs in the daemon
    try:
        for name, pid in kids.items():
            assert wait_for(lambda: not running(pid), timeout=20), f"the {name} process was orphaned"
    finally:
        for pid in kids.values():
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def test_engine_process_killed_mid_stream(tiny_model_dir, tmp_path, stubs, greedy_ids):
    """The engine child dies (SIGKILL): its open stream ends with INTERNAL naming why, health turns
    NOT_SERVING, and the daemon stays up refusing new work with UNAVAILABLE, then stops cleanly."""
    pb2, pb2_grpc = stubs
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--no-http")
    try:
        with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
            assert generate_greedy(stubs, channel) == greedy_ids, "the engine process must generate what the engine does"
            call = long_stream(stubs, channel)
            engine = engine_pid(daemon)
            os.kill(engine, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "the engine process was killed by SIGKILL" in info.value.details()
            assert_engine_down(stubs, channel, "the engine process was killed by SIGKILL")
            assert daemon.proc.poll() is None and not running(engine), "the daemon stays up; the engine is reaped"
        assert daemon.terminate() == 0, daemon.stderr()
        assert "the engine process was killed by SIGKILL; failing its 1 open requests" in daemon.stderr()
    finally:
        daemon.kill()


# Loaded by every Python process of the daemon through PYTHONPATH; acts in the engine child only,
# where it makes LLMEngine.step raise once a prompt starting 13, 13, 13 is running. No request can
# make the real engine raise, so a fault is planted to test what the process layout does then.
ENGINE_FAULT = """
import sys
if "astrai_serve.core.engine_process" in getattr(sys, "orig_argv", ()):
    from astrai_serve.engine import llm_engine

    _step = llm_engine.LLMEngine.step

    def step(self):
        if any(s.token_ids[:3] == [13, 13, 13] for s in self.scheduler.running):
            raise RuntimeError("planted fault: a poisoned prompt")
        return _step(self)

    llm_engine.LLMEngine.step = step
"""


def test_engine_that_raises_fails_its_streams_and_the_daemon_stays_up(tiny_model_dir, tmp_path, stubs, greedy_ids):
    """The engine raises inside its child (which lives on): every open stream ends with INTERNAL
    naming the error, health turns NOT_SERVING, new work gets UNAVAILABLE, and the daemon stays
    up and still stops cleanly."""
    pb2, pb2_grpc = stubs
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ENGINE_FAULT)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--no-http", env={"PYTHONPATH": path})
    try:
        with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
            assert generate_greedy(stubs, channel) == greedy_ids, "healthy until the poisoned prompt"
            stub = pb2_grpc.GenerationServiceStub(channel)
            bystander = long_stream(stubs, channel)
            poisoned = stub.Generate(pb2.GenerateRequest(token_ids=pb2.TokenIds(ids=[13, 13, 13, 7]),
                                                         params=pb2.SamplingParams(max_tokens=4)), timeout=60)
            for call in (poisoned, bystander):
                with pytest.raises(grpc.RpcError) as info:
                    list(call)
                assert info.value.code() == grpc.StatusCode.INTERNAL
                assert "RuntimeError: planted fault: a poisoned prompt" in info.value.details()
            assert_engine_down(stubs, channel, "RuntimeError: planted fault: a poisoned prompt")
            assert daemon.proc.poll() is None, "the daemon stays up"
        assert daemon.terminate() == 0, daemon.stderr()
        assert "engine loop died" in daemon.stderr()
    finally:
        daemon.kill()


def test_async_scheduling_in_the_engine_process(tiny_model_dir, tmp_path, stubs, greedy_ids):
    """The GPU defaults (overlapped steps, async scheduling) forced on here: the streams carry the
    engine's greedy tokens, concurrent streams and a cancelled one leave no page in use."""
    pb2, pb2_grpc = stubs
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--no-http", "--overlap-steps",
                         "--async-scheduling")
    try:
        with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
            stub = pb2_grpc.GenerationServiceStub(channel)
            long = long_stream(stubs, channel)          # the greedy streams below share its steps
            assert [generate_greedy(stubs, channel) for _ in range(3)] == [greedy_ids] * 3
            long.cancel()
            assert wait_for(lambda: stub.GetStats(pb2.GetStatsRequest()).kv_pages_in_use == 0, timeout=10)
            assert generate_greedy(stubs, channel) == greedy_ids
        assert daemon.terminate() == 0, daemon.stderr()
    finally:
        daemon.kill()


def test_daemon_shuts_down_when_its_facade_dies(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log")
    try:
        os.kill(facade_pid(daemon), signal.SIGKILL)
        assert daemon.proc.wait(30) == 1
        assert "the REST facade process exited" in daemon.stderr()
    finally:
        daemon.kill()


def listening_socket_inodes(pid: int, port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` that process `pid` holds open."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "0A":   # 0A: LISTEN
                listening.add(f[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in listening:
            held.add(target[8:-1])
    return held


def test_api_server_count_runs_facades_on_one_port(tiny_model_dir, tmp_path):
    """--api-server-count 2: two facade children serve the one listening socket the daemon bound
    (the daemon itself no longer holds it); concurrent streams through the port all complete;
    one facade dying stops the daemon as the single facade's death does."""
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--api-server-count", "2")
    try:
        url = daemon.ready["http"]
        port = int(url.rsplit(":", 1)[1])
        kids = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in children(daemon.proc.pid)}
        facades = [pid for pid, argv in kids.items() if b"gateway" in argv]
        assert len(facades) == 2, kids
        held = [listening_socket_inodes(pid, port) for pid in facades]
        assert held[0] and held[0] == held[1], "both children must serve the same listening socket"
        assert not listening_socket_inodes(daemon.proc.pid, port), "the daemon hands the socket over"

        def complete(i: int) -> int:
            with httpx.Client(timeout=60) as client:       # a connection of its own per request
                r = client.post(url + "/v1/completions", json={"prompt": [5, 6, i], "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(complete, range(8, 24))) == [4] * 16
        os.kill(facades[1], signal.SIGKILL)
        assert daemon.proc.wait(30) == 1
        assert "the REST facade process exited" in daemon.stderr()
        assert wait_for(lambda: not running(facades[0]), timeout=20), "the other facade stops with the daemon"
    finally:
        daemon.kill()


def test_in_process_layout_keeps_facade_and_engine_on_threads(tiny_model_dir, tmp_path, stubs, greedy_ids):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--http-in-process", "--engine-in-process")
    try:
        assert children(daemon.proc.pid) == []
        r = httpx.post(daemon.ready["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        with grpc.insecure_channel(daemon.ready["grpc"]) as channel:
            assert generate_greedy(stubs, channel) == greedy_ids, "both layouts must generate the same tokens"
        assert daemon.terminate() == 0, daemon.stderr()
    finally:
        daemon.kill()
