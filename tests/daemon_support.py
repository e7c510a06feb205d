"""Helpers for the daemon tests: start `astrai serve` / `astrai gateway` as real processes, and
build gRPC stubs from the .proto alone (not the committed ones), as any outside client would."""
from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


class Process:
    """A running `astrai` subcommand; `ready` holds the fields of its `ready` line."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, timeout: float = 60.0):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "astrai_train.cli", *argv], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})})
        self.ready: dict[str, str] = {}
        line = self._read_line(timeout)
        if "ready" not in line:
            self.kill()
            raise RuntimeError(f"{argv[0]} did not start (stdout {line!r}); stderr:\n{self.stderr()}")
        self.ready = dict(part.split("=", 1) for part in line.split() if "=" in part)
        # Keep draining stdout so the child never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def _read_line(self, timeout: float) -> str:
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else ""

    def stderr(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-5000:]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def start_serve(model_dir: Path, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> Process:
    return Process(["serve", "--model", str(model_dir), "--grpc-port", "0", "--http-port", "0",
                    "--log-level", "warning", "--num-pages", "512", *extra], log_path, env=env)


def proto_stubs(out_dir: Path):
    """Compile protos/astrai/v1/generate.proto into out_dir and import (pb2, pb2_grpc) from there."""
    from grpc_tools import protoc

    code = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
                        "astrai/v1/generate.proto"])
    assert code == 0, "protoc failed on the .proto"
    for name in ("astrai.v1.generate_pb2_grpc", "astrai.v1.generate_pb2", "astrai.v1", "astrai"):
        sys.modules.pop(name, None)  # an earlier call's modules, compiled into another directory
    sys.path.insert(0, str(out_dir))
    try:
        pb2 = importlib.import_module("astrai.v1.generate_pb2")
        pb2_grpc = importlib.import_module("astrai.v1.generate_pb2_grpc")
    finally:
        sys.path.remove(str(out_dir))
    assert str(out_dir) in pb2.__file__, "the stubs must come from the freshly compiled .proto"
    return pb2, pb2_grpc


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll predicate() until it returns a truthy value; return it (or the last falsy one)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


class InProcessStack:
    """The gRPC core (on its own event loop thread) and the REST facade in this process, around an
    engine loop the test owns: for tests that reach inside them (a failing engine, a servicer
    setting). `core.servicer` is the GenerationServicer; `url` the facade's base URL."""

    def __init__(self, engine_loop, **servicer_options):
        import asyncio

        from astrai_serve.facade.server import FacadeServer
        from astrai_serve.core.server import CoreServer, GenerationServicer
        from astrai_serve.facade.app import FacadeConfig

        self.aio = asyncio.new_event_loop()
        threading.Thread(target=self.aio.run_forever, daemon=True).start()

        async def start_core() -> CoreServer:  # the servicer must be made on the loop that serves it
            core = CoreServer(GenerationServicer(engine_loop, "tiny", **servicer_options), "127.0.0.1", 0, api_key=None)
            await core.start()
            return core

        self.core = asyncio.run_coroutine_threadsafe(start_core(), self.aio).result(30)
        self.grpc_target = f"127.0.0.1:{self.core.port}"
        self.facade = FacadeServer(FacadeConfig(grpc_target=self.grpc_target), "127.0.0.1", 0)
        self.facade.start_in_thread()
        assert wait_for(lambda: self.facade.started, timeout=30)
        self.url = self.facade.url

    def stop(self) -> None:
        import asyncio

        self.facade.stop(10)
        asyncio.run_coroutine_threadsafe(self.core.stop(0), self.aio).result(30)
        self.aio.call_soon_threadsafe(self.aio.stop)
