"""The engine in a process of its own: `astrai serve`'s default layout, as vLLM (EngineCore) and
SGLang (the scheduler process) do it.

Why: in one process the engine loop shares a GIL with the gRPC server, whose asyncio and gRPC
Python costs tens of microseconds per stream message; at tens of thousands of messages a second
that fills a core, and each of the engine's GPU launches waits behind it. In its own process the
engine has a GIL of its own, and the daemon's process does only I/O.

The child (`python -m astrai_serve.core.engine_process --fd N`) builds the LLMEngine and runs the
ordinary EngineLoop. Its sinks slim each RequestOutput down to a `Delta` (no `_all_ids`, no whole
`text`: pickling those every step would cost O(length) per request) and its flush hook sends the
step's deltas, the engine stats and the loop's error as ONE message. In the daemon, EngineProcess
offers EngineLoop's interface: a reader thread takes each message, calls the sinks, then the flush
hooks, so the gRPC core cannot tell the two apart and still wakes its event loop once per step.

Requests cross as (submission number, request id, prompt, SamplingParams): the number tells two
submissions of one request id apart, as the sink does for EngineLoop.

Lifetimes: the child ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group, but the
daemon drains before it stops the engine) and stops when its pipe closes, so it never outlives
the daemon, however the daemon dies; while it loads the model, and reads no pipe, the kernel
kills it should the daemon die (PR_SET_PDEATHSIG). When the child dies, the daemon reads the pipe's end: every
open request ends with EngineFailed, `alive` turns False (health NOT_SERVING) and the daemon
stays up, answering errors.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from astrai_serve.child_process import child_env, freeze_startup_heap, python_argv
from astrai_serve.core.engine_loop import (MARKERS, Aborted, EngineDeadError, EngineFailed, EngineHandle, EngineLoop, Entry,
                                      Rejected, Sink, deliver, num_samples, run_hooks)

log = logging.getLogger("astrai.serve.engine_process")


class Delta(NamedTuple):
    """What a stream needs of one RequestOutput: the step's new tokens, text and logprobs, and totals."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list | None
    prompt_logprobs: list | None


def _slim(item: Any) -> Any:
    if isinstance(item, Rejected):  # the engine's exception may not survive pickling as it is
        return Rejected(item.request_id, ValueError(str(item.error)))
    if isinstance(item, MARKERS):
        return item
    return Delta(item.request_id, item.index, item.new_token_ids, item.new_text, item.finished, item.finish_reason,
                 item.prompt_tokens, item.completion_tokens, item.cached_tokens, item.logprobs, item.prompt_logprobs)


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"the engine process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the engine process was killed by signal {-code}"
    return f"the engine process exited unexpectedly (exit code {code})"


# ---- the daemon's side ---------------------------------------------------------------------------

class EngineProcess(EngineHandle):
    """EngineLoop's interface over an engine in a child process. The constructor starts the child
    and returns once it has loaded the model, or raises ValueError/OSError saying why it could not;
    start() begins delivering outputs, on the reader thread."""

    def __init__(self, model_dir: str | Path, overrides: dict[str, Any], log_level: str = "warning"):
        from astrai_serve.engine.config import EngineConfig
        from astrai_train.tokenizer import Tokenizer

        EngineConfig.build(None, **overrides)  # a bad setting fails here, before a process starts
        ours, theirs = socket.socketpair()
        with theirs:
            # stdout=2: the daemon's stdout carries only its ready line; the child logs to stderr.
            self._proc = subprocess.Popen(python_argv(__name__, "--fd", str(theirs.fileno())), env=child_env(),
                                          pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=2)
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        try:
            self._send((os.getpid(), str(model_dir), overrides, log_level))
            self.tokenizer = Tokenizer.from_pretrained(model_dir)  # while the child loads the model
            info = self._ready()
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            self._conn.close()
            raise
        super().__init__("astrai-engine-reader")
        self.max_seq_len, self.vocab_size = int(info["max_seq_len"]), int(info["vocab_size"])
        self._stats: dict[str, int] = info["stats"]
        self._entries: dict[int, Entry] = {}  # submission number -> request; the reader ends them
        self._numbers = itertools.count()
        self._stopping = False

    def _ready(self) -> dict[str, Any]:
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            kind, payload = "died", None
        if kind == "ready":
            return payload
        if kind == "error":
            raise OSError(payload)
        raise OSError(f"{_death(self._proc.wait())} while loading the model (its log is above)")

    # ---- EngineLoop's interface ------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return len(self._entries)

    def stats(self) -> Any:
        """The engine's stats (EngineStats' fields) as of the end of the last step."""
        return SimpleNamespace(**self._stats)

    def submit(self, request_id: str, prompt: Any, params: Any, sink: Sink) -> None:
        if not self.alive:
            raise EngineDeadError(self._error or "the engine process is not running")
        number = next(self._numbers)
        self._entries[number] = Entry(request_id, sink, num_samples(params))
        if not self._send(("add", number, request_id, prompt, params)):
            self._entries.pop(number, None)
            raise EngineDeadError(self._error or "the engine process has exited")

    def abort(self, request_id: str, sink: Sink | None = None) -> None:
        # A snapshot of the entries: the reader thread removes them as requests end.
        for number, entry in list(self._entries.items()):
            if entry.request_id == request_id and (sink is None or entry.sink is sink):
                self._entries.pop(number, None)  # as with EngineLoop: nothing more reaches the sink
                self._send(("abort", number, request_id))

    def stop(self, timeout: float | None = None) -> None:
        """Abort everything in flight (each sink gets Aborted) and end the child; kill it if it
        has not ended within timeout (plus a few seconds to exit)."""
        if self._thread.ident is None:
            self._thread.start()  # it reads the child's last messages and notices its exit
        self._stopping = True
        self._send(("stop", timeout))
        self._thread.join(None if timeout is None else timeout + 5)
        if self._thread.is_alive():
            log.error("the engine process did not stop in time; killing it")
            self._proc.kill()
            self._thread.join()
        self._conn.close()

    # ---- internals -------------------------------------------------------------------------
    def _send(self, message: Any) -> bool:
        with self._send_lock:
            try:
                self._conn.send(message)
                return True
            except (OSError, ValueError):  # the child has gone, or stop() closed our end
                return False

    def _run(self) -> None:  # the reader thread
        try:
            while True:
                try:
                    records, stats, error = self._conn.recv()
                except (EOFError, OSError):
                    break
                self._stats = stats
                for number, item in records:
                    entry = self._entries.get(number)
                    if entry is None:
                        continue  # aborted while the step ran
                    deliver(entry.sink, item)
                    if entry.ends_with(item):
                        self._entries.pop(number, None)
                if error is not None and self._error is None:
                    self._error = error  # the engine raised: the child has failed its requests already
                run_hooks(self._flush_hooks)
        except Exception as exc:  # an unreadable message: this side cannot go on either
            log.exception("reading the engine process's messages failed")
            self._error = self._error or f"unreadable message from the engine process: {type(exc).__name__}: {exc}"
            self._proc.kill()
        self._end()

    def _end(self) -> None:
        """The child has closed the pipe (stopped, or died): reap it and end what is still open."""
        try:
            code = self._proc.wait(5)
        except subprocess.TimeoutExpired:  # it closed the pipe but lingers: it is of no use now
            self._proc.kill()
            code = self._proc.wait()
        if self._error is None and not self._stopping:
            self._error = _death(code)
            log.error("%s; failing its %d open requests", self._error, len(self._entries))
        while self._entries:
            _, entry = self._entries.popitem()
            deliver(entry.sink, EngineFailed(entry.request_id, self._error) if self._error else
                    Aborted(entry.request_id))
        run_hooks(self._flush_hooks)
        self._stopped.set()


# ---- the child's side ----------------------------------------------------------------------------

class _Worker:
    """Feeds the pipe's commands to an EngineLoop and sends each step's outputs back in one message."""

    def __init__(self, conn: Connection, loop: EngineLoop):
        self.conn, self.loop = conn, loop
        self._pending: list[tuple[int, Any]] = []  # loop thread only: its sinks fill it, its flush hook sends it
        # Submission number -> sink, for aborts. The loop holds each sink while the request runs;
        # once it lets go, the entry vanishes by itself (an abort of an ended request is a no-op).
        self._sinks: weakref.WeakValueDictionary[int, Sink] = weakref.WeakValueDictionary()
        self._send_lock = threading.Lock()
        loop.add_flush_hook(self._flush)

    def serve(self) -> None:
        self.loop.start()
        while True:
            try:
                command = self.conn.recv()
            except (EOFError, OSError):  # the daemon is gone: nobody wants our outputs
                command = ("stop", 5.0)
            if command[0] == "stop":
                self.loop.stop(command[1])
                return
            if command[0] == "add":
                _, number, request_id, prompt, params = command
                sink = self._sinks[number] = self._sink(number)
                try:
                    self.loop.submit(request_id, prompt, params, sink)
                except EngineDeadError as exc:  # the loop died before this request arrived
                    self._send(([(number, EngineFailed(request_id, str(exc)))], self._stats(), self.loop.error))
            elif command[0] == "abort":
                _, number, request_id = command
                sink = self._sinks.get(number)
                if sink is not None:
                    self.loop.abort(request_id, sink)

    def _sink(self, number: int) -> Sink:
        return lambda item: self._pending.append((number, _slim(item)))

    def _stats(self) -> dict[str, int]:
        return dataclasses.asdict(self.loop.stats())

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        self._send((batch, self._stats(), self.loop.error))

    def _send(self, message: Any) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except OSError:  # the daemon is gone; the main thread reads the pipe's end and stops us
                pass


def _die_with_parent(on: bool) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL if on else 0)  # 1: PR_SET_PDEATHSIG


def child_main(fd: int) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the daemon decides when the engine stops
    os.set_inheritable(fd, False)  # no grandchild may hold the pipe open after we die
    _die_with_parent(True)  # until the model is loaded: meanwhile nothing reads the pipe
    conn = Connection(fd)
    try:
        parent, model_dir, overrides, log_level = conn.recv()
    except EOFError:
        return 0
    if os.getppid() != parent:  # it died before we asked to die with it
        return 0
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from astrai_serve.engine.llm_engine import LLMEngine

        engine = LLMEngine(model_dir, **overrides)
    except Exception as exc:
        if isinstance(exc, (ValueError, OSError)):  # a bad model directory or setting: one line says it
            message = str(exc)
        else:
            log.exception("the engine failed to start")
            message = f"the engine failed to start: {type(exc).__name__}: {exc}"
        try:
            conn.send(("error", message))
        except OSError:
            pass
        return 2
    freeze_startup_heap()
    worker = _Worker(conn, EngineLoop(engine))
    conn.send(("ready", {"max_seq_len": engine.max_seq_len, "vocab_size": engine.model_config.vocab_size,
                         "stats": dataclasses.asdict(engine.stats())}))
    # From here the pipe's end stops us, gracefully. (The signal also fires when the *thread* that
    # started us ends: past the constructor, which waits for "ready", that thread may well end.)
    _die_with_parent(False)
    worker.serve()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the engine child of `astrai serve` (not for direct use)")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the daemon")
    # Run the copy imported under the package's name, so pickled Deltas name astrai_serve.core.engine_process.
    from astrai_serve.core.engine_process import child_main as main

    sys.exit(main(parser.parse_args().fd))
