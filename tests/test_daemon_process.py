"""`astrai serve`'s process layout: the REST facade runs as a child process (`astrai gateway`)
that serves on the port the daemon bound, drains with it, and never outlives it; the daemon in
turn does not run on half up when its facade dies. `--http-in-process` keeps the facade on a thread."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from daemon_support import start_serve, wait_for

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


def facade_pid(daemon) -> int:
    kids = children(daemon.proc.pid)
    assert len(kids) == 1, f"expected one facade child, got {kids}"
    cmdline = Path(f"/proc/{kids[0]}/cmdline").read_bytes().split(b"\0")
    assert b"gateway" in cmdline and b"--stop-on-stdin-eof" in cmdline
    return kids[0]


def test_sigterm_drains_http_streams_then_stops_the_facade(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--shutdown-timeout", "30", "--api-key", "k")
    try:
        child = facade_pid(daemon)
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
    finally:
        daemon.kill()


def test_facade_exits_when_the_daemon_is_killed(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log")
    child = facade_pid(daemon)
    daemon.kill()  # SIGKILL: no shutdown code runs in the daemon
    try:
        assert wait_for(lambda: not running(child), timeout=20), "the facade process was orphaned"
    finally:
        if running(child):
            os.kill(child, signal.SIGKILL)


def test_daemon_shuts_down_when_its_facade_dies(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log")
    try:
        os.kill(facade_pid(daemon), signal.SIGKILL)
        assert daemon.proc.wait(30) == 1
        assert "the REST facade process exited" in daemon.stderr()
    finally:
        daemon.kill()


def test_http_in_process_keeps_the_facade_on_a_thread(tiny_model_dir, tmp_path):
    daemon = start_serve(tiny_model_dir, tmp_path / "serve.log", "--http-in-process")
    try:
        assert children(daemon.proc.pid) == []
        r = httpx.post(daemon.ready["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert daemon.terminate() == 0, daemon.stderr()
    finally:
        daemon.kill()
