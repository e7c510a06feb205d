"""`astrai serve`'s REST facade as a child process: `astrai gateway` serving on the socket the
daemon bound, and dialling the daemon's gRPC core like any other client.

Why a process: under load the facade turns tens of thousands of gRPC messages a second into SSE
chunks. On a thread of the daemon that Python work holds the GIL the engine loop needs between
its GPU launches, so every microsecond of it is taken from generation; in its own process it runs
on another core.

Lifetime: the child ignores SIGINT/SIGTERM and stops when its stdin closes. The daemon closes it
after draining (so the facade relays every stream's last message first), and the OS closes it
when the daemon dies, however it dies: the facade never outlives the daemon.
"""
from __future__ import annotations

import asyncio

from astrai_serve.auth import API_KEY_ENV
from astrai_serve.child_process import child_env, python_argv
from astrai_serve.facade_server import bind_socket, http_url


class FacadeProcess:
    """Binds host:port now (a port in use fails at once; port 0 is resolved); start() spawns the child."""

    def __init__(self, grpc_target: str, host: str, port: int, api_key: str | None, log_level: str = "warning"):
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.grpc_target, self.api_key, self.log_level = grpc_target, api_key, log_level
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn the child and wait for its ready line; OSError if it does not come."""
        fd = self.sock.fileno()
        env = child_env(**{API_KEY_ENV: self.api_key or ""})  # the key travels here, not in argv where `ps` shows it
        self.proc = await asyncio.create_subprocess_exec(
            *python_argv("astrai_train.cli", "gateway", "--grpc-target", self.grpc_target,
                         "--http-fd", str(fd), "--stop-on-stdin-eof", "--log-level", self.log_level),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(fd,), env=env)
        self.sock.close()  # the child holds its own copy of the listening socket
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            line = b""
        if b" ready " not in line:
            code = await self.stop(5.0)
            raise OSError(f"the REST facade process did not start (exit code {code}; its log is above)")

    async def wait(self) -> int:
        """Returns the child's exit code once it has exited."""
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Close the child's stdin: it finishes its open responses and exits. Killed after timeout."""
        if self.proc is None:
            self.sock.close()
            return None
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            return await self.proc.wait()
