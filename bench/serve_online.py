"""W4 of bench/serve.py: `astrai serve` as a real subprocess, loaded through its OpenAI REST facade
by the `openai` package's AsyncOpenAI client, streaming, at a fixed request rate.

Per request: TTFT = first text chunk - send; TPOT = (last chunk - first chunk) / (tokens - 1).
Throughput = all completion tokens / (last response end - first send). Requests are spread over
several client processes so that parsing ~10^5 SSE chunks never makes the client the bottleneck;
each reports how busy its CPU was, which the table shows.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import common


def engine_flags(engine: dict[str, Any]) -> list[str]:
    """Engine settings as `astrai serve` flags (each EngineConfig field is a flag)."""
    flags = []
    for name, value in engine.items():
        flag = name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            flags += [f"--{flag}", str(value)]
    return flags


class Daemon:
    """`astrai serve` on free ports. The process starts at once; `wait_ready()` blocks until it
    printed its ready line and its REST facade answers /health with 200, then `url` is set."""

    def __init__(self, model_dir: str, engine: dict[str, Any], extra_env: dict[str, str] | None = None,
                 flags: list[str] | tuple[str, ...] = ()) -> None:
        env = {**os.environ, **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(common.ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "astrai_train.cli", "serve", "--model", str(model_dir), "--grpc-port", "0",
               "--http-port", "0", "--log-level", "warning", *engine_flags(engine), *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=common.ROOT)
        self._ready: dict[str, str] = {}
        self._seen = threading.Event()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        self.url = self.model = ""

    def _read_stdout(self) -> None:
        # Reads to EOF (so the daemon never blocks on a full pipe); the first `ready` line counts.
        for line in self.proc.stdout:
            if not self._seen.is_set() and " ready " in f" {line} ":
                self._ready = dict(part.split("=", 1) for part in line.split() if "=" in part)
                self._seen.set()
        self._seen.set()  # EOF: the daemon exited

    def wait_ready(self, timeout_s: float = 300.0) -> "Daemon":
        self._seen.wait(timeout_s)
        if "grpc" not in self._ready:
            code = self.proc.poll()
            self.stop()
            why = f"exited with code {code}" if code is not None else f"not ready within {timeout_s:.0f} s"
            raise RuntimeError(f"astrai serve {why} (its log is above)")
        self.url, self.model = self._ready.get("http", ""), self._ready.get("model", "model")
        deadline = time.monotonic() + 60
        while self.url and not self._healthy():   # --no-http: the ready line is the whole check
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.url}/health did not answer 200 within 60 s")
            time.sleep(0.2)
        return self

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the daemon's processes: its main thread (the gRPC core's event
        loop), the whole daemon process, the engine child, and the facade children (summed)."""
        def seconds(pid: int | str, task: str = "") -> float:
            fields = Path(f"/proc/{pid}{task}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

        def children(word: bytes) -> float:
            total = 0.0
            for c in kids:
                try:
                    total += seconds(c) if word in Path(f"/proc/{c}/cmdline").read_bytes() else 0.0
                except OSError:  # it exited since the listing
                    pass
            return total

        pid = self.proc.pid
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return {"core": seconds(pid, f"/task/{pid}"), "daemon": seconds(pid),
                "engine": children(b"astrai_serve.core.engine_process"), "facade": children(b"gateway")}

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon drains and exits), then SIGKILL if it has not exited within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _one(client: Any, model: str, prompt: list[int], max_tokens: int, send_at: float,
               temperature: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, send_at - time.time()))
    start = time.time()
    first = last = None
    tokens = chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.time()
            if chunk.choices and chunk.choices[0].text:
                first = first if first is not None else now
                last, chunks = now, chunks + 1
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # a failed request is counted and reported; the others go on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"start": start, "first": first, "last": last, "end": time.time(), "tokens": tokens or chunks}


def client_worker(url: str, model: str, jobs: list[tuple[list[int], int, float]], temperature: float,
                  timeout_s: float = 300.0) -> dict[str, Any]:
    """One client process: its share of the requests, each sent at its absolute time (time.time);
    a request taking longer than timeout_s counts as an error (so a hang cannot stall the bench)."""
    from openai import AsyncOpenAI

    async def main() -> list[dict[str, Any]]:
        client = AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=timeout_s)
        try:
            return await asyncio.gather(*(_one(client, model, p, n, at, temperature) for p, n, at in jobs))
        finally:
            await client.close()

    cpu, wall = time.process_time(), time.time()
    results = asyncio.run(main())
    return {"results": results, "cpu_busy": (time.process_time() - cpu) / max(time.time() - wall, 1e-9)}


def server_median(url: str, histogram: str) -> float | None:
    """The upper bound of the bucket holding the median of one of the daemon's /metrics
    histograms (the core's own view of a latency: compared with the client's, it tells the
    engine's share from the REST and streaming path's); None if it has no observations."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(f"{histogram}_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), int(float(line.rsplit(" ", 1)[1]))))
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return None
    return next(bound for bound, cumulative in buckets if cumulative >= total / 2)


def _ready_client(hold_s: float) -> None:
    """Import the client in a pool process, and hold it a moment so the pool starts them all."""
    import openai  # noqa: F401

    time.sleep(hold_s)


def load_test(url: str, model: str, requests: list[tuple[list[int], int]], rate: float, client_procs: int,
              temperature: float, timeout_s: float = 300.0) -> dict[str, Any]:
    """Send `requests` (prompt ids, max_tokens) at `rate` per second, evenly spaced; summarise."""
    client_worker(url, model, [(p, 16, time.time()) for p, _ in requests[:8]], temperature, timeout_s)  # warm-up
    if client_procs == 1:
        start = time.time() + 0.2
        jobs = [(p, n, start + i / rate) for i, (p, n) in enumerate(requests)]
        outs = [client_worker(url, model, jobs, temperature, timeout_s)]
    else:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that holds a CUDA context
        with concurrent.futures.ProcessPoolExecutor(client_procs, mp_context=ctx) as pool:
            # Start every client process and import the client before the clock starts: a
            # process still starting when its first requests are due sends them late, in a burst
            # (seen: 3 s late with a fixed head start, which the server's TTFT then carried).
            list(pool.map(_ready_client, [0.5] * client_procs))
            start = time.time() + 0.2
            jobs = [(p, n, start + i / rate) for i, (p, n) in enumerate(requests)]
            futures = [pool.submit(client_worker, url, model, jobs[k::client_procs], temperature, timeout_s)
                       for k in range(client_procs)]
            outs = [f.result() for f in futures]
    results = [r for o in outs for r in o["results"]]
    ok = [r for r in results if "error" not in r and r["first"] is not None]
    summary: dict[str, Any] = {"ok": len(ok), "sent": len(results), "cpu_busy": max(o["cpu_busy"] for o in outs),
                               "errors": [r["error"] for r in results if "error" in r]}
    if ok:
        ttft = [1e3 * (r["first"] - r["start"]) for r in ok]
        tpot = [1e3 * (r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
        summary["tps"] = sum(r["tokens"] for r in ok) / (max(r["end"] for r in ok) - min(r["start"] for r in ok))
        summary["ttft"] = (common.percentile(ttft, 50), common.percentile(ttft, 99))
        # TTFT by arrival quarter: a queue that builds up shows as a rising series, a fixed
        # delay (startup, a slow path) as a flat one; and how late the clients sent (their start)
        by_send = sorted(ok, key=lambda r: r["start"])
        q = max(1, len(by_send) // 4)
        summary["ttft_quarters"] = [common.median([1e3 * (r["first"] - r["start"]) for r in by_send[i:i + q]])
                                    for i in range(0, len(by_send), q)][:4]
        due = [at for k in range(len(outs)) for _, _, at in jobs[k::len(outs)]]   # results' order
        summary["send_lag_ms"] = 1e3 * max(r["start"] - at for r, at in zip(results, due) if "start" in r)
        summary["tpot"] = (common.percentile(tpot, 50), common.percentile(tpot, 99)) if tpot else (None, None)
    return summary
