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
from astrai_serve.facade.server import bind_socket, http_url


class FacadeProcess:
    """Binds host:port now (a port in use fails at once; port 0 is resolved); start() spawns the
    children: `count` facade processes serving on the one listening socket (vLLM's
    --api-server-count). The kernel hands each new connection to whichever child accepts it
    first, so a busy child takes fewer; each child dials the core on its own channel."""

    def __init__(self, grpc_target: str, host: str, port: int, api_key: str | None, log_level: str = "warning",
                 count: int = 1):
        if count < 1:
            raise ValueError(f"facade process count {count}: must be >= 1")
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.grpc_target, self.api_key, self.log_level, self.count = grpc_target, api_key, log_level, count
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def url(self) -> str:
        return http_url(self.host, self.port)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn the children and wait for every ready line; OSError if one does not come."""
        fd = self.sock.fileno()
        env = child_env(**{API_KEY_ENV: self.api_key or ""})  # the key travels here, not in argv where `ps` shows it
        for _ in range(self.count):
            self.procs.append(await asyncio.create_subprocess_exec(
                *python_argv("astrai_train.cli", "gateway", "--grpc-target", self.grpc_target,
                             "--http-fd", str(fd), "--stop-on-stdin-eof", "--log-level", self.log_level),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(fd,), env=env))
        self.sock.close()  # each child holds its own copy of the listening socket
        lines = await asyncio.gather(*(self._ready_line(p, timeout) for p in self.procs))
        if not all(b" ready " in line for line in lines):
            code = await self.stop(5.0)
            raise OSError(f"the REST facade process did not start (exit code {code}; its log is above)")

    @staticmethod
    async def _ready_line(proc: asyncio.subprocess.Process, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            return b""

    async def wait(self) -> int:
        """Returns the exit code of the first child to exit: the HTTP half of the service is then
        partly gone, and the daemon treats it as gone."""
        assert self.procs
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            for w in waits:
                w.cancel()

    async def stop(self, timeout: float = 10.0) -> int | None:
        """Close the children's stdin: each finishes its open responses and exits; killed after
        timeout. Returns the first nonzero exit code, else 0 (None if none was started)."""
        if not self.procs:
            self.sock.close()
            return None
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        codes = await asyncio.gather(*(self._stop_one(p, timeout) for p in self.procs))
        return next((c for c in codes if c), 0)

    @staticmethod
    async def _stop_one(proc: asyncio.subprocess.Process, timeout: float) -> int:
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            return await proc.wait()
