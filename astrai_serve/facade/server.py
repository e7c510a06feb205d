"""Runs the REST facade under uvicorn: as the whole process (`astrai gateway`, which is also how
`astrai serve` runs it, as a child: see facade_process.py) or on a thread beside the gRPC core
(`astrai serve --http-in-process`).

The listening socket is bound before uvicorn starts, so a port already in use fails at once with
a clear message, and port 0 (any free port) reports the port actually bound. `astrai serve` binds
it itself and hands it to its facade child, which serves on the inherited socket.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading

import uvicorn

from astrai_serve.facade.app import FacadeConfig, create_app

log = logging.getLogger("astrai.serve.facade")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def http_url(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port}"


class FacadeServer:
    """uvicorn on host:port, or on `sock`, a socket already bound and listening (host, port unused)."""

    def __init__(self, config: FacadeConfig, host: str, port: int, log_level: str = "warning",
                 sock: socket.socket | None = None):
        self.sock = sock if sock is not None else bind_socket(host, port)
        self.host = host if sock is None else sock.getsockname()[0]
        self.port = self.sock.getsockname()[1]
        uv_config = uvicorn.Config(create_app(config), log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    def run(self, stop_on_stdin_eof: bool = False) -> None:
        """Serve in this thread until stopped. On the main thread SIGTERM/SIGINT stop it gracefully
        (a second one forcefully) and the process then exits normally: uvicorn's own handling would
        re-raise the signal after shutdown and kill the process with it, so it is replaced.

        stop_on_stdin_eof (the facade child of `astrai serve`): ignore those signals and stop when
        stdin closes instead. The parent owns the child's lifetime: a Ctrl-C reaches the whole
        process group, yet the facade must keep relaying streams while the parent drains; the
        parent closes the pipe once it has, and the OS closes it if the parent dies, however it dies."""
        if threading.current_thread() is threading.main_thread():
            handler = signal.SIG_IGN if stop_on_stdin_eof else self._on_signal
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, handler)
        if stop_on_stdin_eof:
            threading.Thread(target=self._stop_at_stdin_eof, name="astrai-facade-parent", daemon=True).start()
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self.server.run(sockets=[self.sock])

    def _stop_at_stdin_eof(self) -> None:
        try:
            sys.stdin.buffer.read()  # the parent never writes: this returns when the pipe closes
        except (OSError, ValueError, AttributeError):  # no usable stdin at all: nothing to wait for
            pass
        self.server.should_exit = True

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.server.should_exit:
            self.server.force_exit = True
        self.server.should_exit = True

    def start_in_thread(self) -> None:
        # Off the main thread uvicorn installs no signal handlers; the daemon owns those.
        self._thread = threading.Thread(target=self.run, name="astrai-facade", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
