"""Runs the LLMEngine on its own thread, so the gRPC and HTTP layers never wait for a step.

The engine is single-threaded: only the loop thread calls it. Other threads talk to it through
a command queue (`submit`, `abort`, `stop`) and get results through a per-request *sink*: a
callable the loop calls with each `RequestOutput` (and with a `Rejected`, `Aborted` or
`EngineFailed` marker). A sink must not block; the gRPC servicer's sink hands the item to its
asyncio loop with `call_soon_threadsafe`, which is that request's output queue.

Rejections arrive through the sink too, because `add_request` validates on the loop thread: the
caller learns whether its request was accepted from the first item it receives.

Flush hooks run on the loop thread after each round of deliveries, so a consumer can batch:
the gRPC core's sinks only append to a list, and its hook hands the whole step's outputs to the
event loop in one `call_soon_threadsafe` instead of one wake-up per token per stream.

`engine_process.py` runs this same loop in a child process and offers its interface (EngineHandle)
in the daemon; the helpers below (Entry, deliver, run_hooks) are shared with it.
"""
from __future__ import annotations

import logging
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("astrai.serve.engine_loop")


@dataclass(frozen=True)
class Rejected:
    """add_request refused the request; `error` is its ValueError (a client mistake)."""

    request_id: str
    error: Exception


@dataclass(frozen=True)
class Aborted:
    """The loop ended the request (shutdown, or it vanished from the engine); no more outputs will come."""

    request_id: str


@dataclass(frozen=True)
class EngineFailed:
    """The engine raised; the loop is dead and every in-flight request ends with this."""

    request_id: str
    message: str


MARKERS = (Rejected, Aborted, EngineFailed)  # the items that end a request; always its last
Sink = Callable[[Any], None]


class EngineDeadError(RuntimeError):
    """Raised by submit once the loop is stopped or has died."""


def num_samples(params: Any) -> int:
    """How many samples (`n`) a request's SamplingParams ask for."""
    return max(1, int(getattr(params, "n", 1) or 1))


@dataclass
class Entry:
    """A submitted request: where its outputs go, and how far it has got."""

    request_id: str
    sink: Sink
    n: int            # samples the request produces; it is done when all have finished
    finished: int = 0

    def ends_with(self, item: Any) -> bool:
        """Count one delivered item; True once the request is over (a marker, or its last sample finished)."""
        if isinstance(item, MARKERS):
            return True
        self.finished += bool(item.finished)
        return self.finished >= self.n


def deliver(sink: Sink, item: Any) -> None:
    try:
        sink(item)
    except Exception:  # a broken consumer must not take the engine down with it
        log.exception("a request sink raised; dropping its output")


def run_hooks(hooks: list[Callable[[], None]]) -> None:
    for hook in hooks:
        try:
            hook()
        except Exception:
            log.exception("a flush hook raised")


class EngineHandle:
    """What the gRPC core drives. Subclasses add submit, abort, stop(timeout), stats(),
    num_inflight and what requests are checked against (tokenizer, max_seq_len, vocab_size).
    Outputs reach the sinks, then the flush hooks, on one thread running `_run`: EngineLoop steps
    the engine there; EngineProcess (engine_process.py) reads what its engine process sends."""

    def __init__(self, thread_name: str):
        self._error: str | None = None
        self._stopped = threading.Event()
        self._flush_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopped.is_set()

    @property
    def error(self) -> str | None:
        """Why the engine died, or None."""
        return self._error

    def add_flush_hook(self, hook: Callable[[], None]) -> None:
        """Run hook on the delivery thread after each round of sink deliveries."""
        self._flush_hooks.append(hook)


class EngineLoop(EngineHandle):
    """Owns an LLMEngine and steps it on a daemon thread while it has work."""

    def __init__(self, engine: Any):
        super().__init__("astrai-engine-loop")
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._entries: dict[str, Entry] = {}   # loop thread only
        self._inflight = 0                      # len(_entries), published for other threads
        self._stats = engine.stats()            # last snapshot, replaced (never mutated) per step

    # ---- any thread ------------------------------------------------------------------------
    @property
    def num_inflight(self) -> int:
        return self._inflight

    def stats(self) -> Any:
        """The engine's EngineStats as of the end of the last step."""
        return self._stats

    # What the gRPC side needs to check and tokenize requests (EngineProcess has the same).
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + completion: the model's context, or less when the KV pool is smaller."""
        return int(self.engine.max_seq_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.model_config.vocab_size)

    def submit(self, request_id: str, prompt: Any, params: Any, sink: Sink) -> None:
        """Queue a request. Its outputs (or a Rejected) go to sink, on the loop thread."""
        if not self.alive:
            raise EngineDeadError(self._error or "the engine loop is not running")
        self._commands.put(("add", request_id, prompt, params, sink))

    def abort(self, request_id: str, sink: Sink | None = None) -> None:
        """Abort a request; with sink given, only if that submission is the one registered
        (so a rejected duplicate id cannot abort the request that owns the id)."""
        self._commands.put(("abort", request_id, sink))

    def stop(self, timeout: float | None = None) -> None:
        """Abort everything in flight (each sink gets Aborted) and end the thread."""
        if self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)
        self._stopped.set()

    # ---- loop thread -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                for command in self._drain(block=not engine.has_unfinished_requests()):
                    if command[0] == "stop":
                        self._abort_all()
                        return
                    self._handle(command)
                if engine.has_unfinished_requests():
                    self._dispatch(engine.step())
                if self._entries and not engine.has_unfinished_requests():
                    self._end_orphans()
                self._stats = engine.stats()
                self._inflight = len(self._entries)
                self._flush()
        except Exception as exc:  # the engine is in an unknown state: fail everything, die loudly
            self._error = f"{type(exc).__name__}: {exc}"
            log.error("engine loop died:\n%s", traceback.format_exc())
            for request_id, entry in self._entries.items():
                deliver(entry.sink, EngineFailed(request_id, self._error))
            self._entries.clear()
            self._inflight = 0
        finally:
            self._flush()
            self._stopped.set()

    def _drain(self, block: bool) -> list[tuple]:
        commands = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _handle(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, sink = command
            if request_id in self._entries:
                deliver(sink, Rejected(request_id, ValueError(
                    f"request_id {request_id!r} is already running; request ids must be unique")))
                return
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:
                deliver(sink, Rejected(request_id, exc))
                return
            self._entries[request_id] = Entry(request_id, sink, num_samples(params))
        elif command[0] == "abort":
            _, request_id, sink = command
            entry = self._entries.get(request_id)
            if entry is None or (sink is not None and entry.sink is not sink):
                return  # already finished, never accepted, or someone else's request
            del self._entries[request_id]
            self.engine.abort_request(request_id)

    def _dispatch(self, outputs: list[Any]) -> None:
        for out in outputs:
            entry = self._entries.get(out.request_id)
            if entry is None:
                continue  # aborted while this step ran
            if getattr(out, "error", None) is not None:
                # Failed inside the engine before producing anything (a grammar that compiled
                # after admission and turned out invalid): the client gets the reason as a
                # rejection (REST 400 / INVALID_ARGUMENT), not an empty "abort".
                del self._entries[out.request_id]
                self.engine.abort_request(out.request_id)   # its other samples, if any
                deliver(entry.sink, Rejected(out.request_id, ValueError(out.error)))
                continue
            deliver(entry.sink, out)
            if entry.ends_with(out):
                del self._entries[out.request_id]

    def _end_orphans(self) -> None:
        # The engine has nothing left, yet some request never got its final output: end its
        # stream rather than leave a client waiting forever on a request nobody will step.
        for request_id, entry in self._entries.items():
            log.warning("request %s ended inside the engine without a final output; closing it", request_id)
            deliver(entry.sink, Aborted(request_id))
        self._entries.clear()

    def _abort_all(self) -> None:
        for request_id, entry in list(self._entries.items()):
            self.engine.abort_request(request_id)
            deliver(entry.sink, Aborted(request_id))
        self._entries.clear()
        self._inflight = 0
        self._stats = self.engine.stats()

    def _flush(self) -> None:
        run_hooks(self._flush_hooks)
