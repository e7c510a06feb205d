"""Runs the REST facade under uvicorn: on a thread beside the gRPC core (`astrai serve`) or as
the whole process (`astrai gateway`).

The listening socket is bound here, before uvicorn starts, so a port already in use fails at
once with a clear message, and port 0 (any free port) reports the port actually bound.
"""
from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading

import uvicorn

from astrai_serve.openai_api import FacadeConfig, create_app

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


class FacadeServer:
    def __init__(self, config: FacadeConfig, host: str, port: int, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host = host
        self.port = self.sock.getsockname()[1]
        uv_config = uvicorn.Config(create_app(config), log_level=log_level, access_log=False,
                                   timeout_graceful_shutdown=5, lifespan="on")
        self.server = uvicorn.Server(uv_config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve in this thread until stopped. On the main thread SIGTERM/SIGINT stop it gracefully
        (a second one forcefully) and the process then exits normally: uvicorn's own handling would
        re-raise the signal after shutdown and kill the process with it, so it is replaced."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self.server.run(sockets=[self.sock])

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
