"""`astrai serve`: the gRPC core, with the engine and the OpenAI REST facade in child processes.

    astrai serve --model DIR [--host 127.0.0.1] [--grpc-port 50051] [--http-port 8000] [--no-http]
                 [--api-server-count N] [--http-in-process] [--engine-in-process]
                 [--api-key KEY | env ASTRAI_API_KEY]
                 [--served-model-name NAME] [--shutdown-timeout S] [--tool-call-parser auto|hermes|none]
                 [--generation-config auto|none|DIR]
                 [engine options]

The daemon's process runs only I/O: the gRPC core on the main thread's event loop. The engine
steps in a child process (engine_process.py), so the core's per-message Python never competes
with it for a GIL (`--engine-in-process` steps it on a thread here instead: EngineLoop). The
facade is `astrai gateway` in another child process (facade_process.py) that serves on the HTTP
socket bound here and reaches the core over gRPC like any other client (`--api-server-count N`
runs N of them on the one socket; `--http-in-process` runs it on a thread here instead). Once both listen, one line goes to stdout:

    astrai serve: ready grpc=127.0.0.1:50051 http=http://127.0.0.1:8000 model=NAME

SIGTERM or SIGINT: stop admitting (health turns NOT_SERVING, new calls get UNAVAILABLE/503),
let in-flight requests finish for up to --shutdown-timeout seconds, abort the rest, stop the
engine and the facade, exit 0. A second signal skips the wait. Should a facade process die,
the daemon shuts down the same way and exits 1, so a supervisor restarts the whole service.
Should the engine process die, the daemon stays up: open requests end with an error, health
turns NOT_SERVING and new requests get UNAVAILABLE, as when the engine raises.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from astrai_serve.auth import API_KEY_ENV, resolve_api_key
from astrai_serve.child_process import freeze_startup_heap
from astrai_serve.cli.engine_args import add_engine_arguments, engine_overrides

log = logging.getLogger("astrai.serve")
MAX_API_SERVERS = 64     # each is a whole Python process with a gRPC channel: more is a typo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model directory (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind both servers to (default: loopback only)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC core port; 0 picks a free one (default 50051)")
    parser.add_argument("--http-port", type=int, default=8000, help="REST facade port; 0 picks a free one (default 8000)")
    parser.add_argument("--no-http", action="store_true", help="run the gRPC core alone, without the REST facade")
    parser.add_argument("--api-server-count", type=int, default=1,
                        help="REST facade processes serving the one HTTP port (as vLLM's flag): each relays its "
                             "share of the streams on its own CPU core (default 1)")
    parser.add_argument("--http-in-process", action="store_true",
                        help="run the REST facade on a thread of this process instead of a child process "
                             "(it then shares the gRPC core's GIL: slower under load)")
    # dest: `engine_*` names are the engine's own settings (engine_args.engine_overrides).
    parser.add_argument("--engine-in-process", dest="in_process_engine", action="store_true",
                        help="step the engine on a thread of this process instead of a child process "
                             "(it then shares the gRPC core's GIL: slower under load)")
    parser.add_argument("--api-key", default=None,
                        help=f"require this key from clients (HTTP 'Authorization: Bearer', gRPC 'authorization' "
                             f"metadata); default: ${API_KEY_ENV}, else no key")
    parser.add_argument("--served-model-name", default=None, help="model name clients send and see (default: the directory's name)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may keep running after SIGTERM before they are aborted (default 30)")
    parser.add_argument("--generation-config", default="auto", metavar="auto|none|DIR",
                        help="sampling defaults for requests that leave a field unset (temperature, top_p, top_k, "
                             "min_p, repetition_penalty, max_tokens): 'auto' (default) the model directory's "
                             "generation_config.json, as vLLM does; 'none' the API's own defaults (vLLM's "
                             "--generation-config vllm); or a directory holding such a file")
    parser.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "none"],
                        help="how the model writes tool calls, for OpenAI tool calling (as vLLM's flag): 'hermes' is "
                             "Qwen's and Hermes' <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>; 'none' "
                             "refuses tool_choice other than \"none\"; 'auto' (default) is hermes when the chat "
                             "template writes <tool_call> blocks, else none")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")
    add_engine_arguments(parser)


def _connect_host(host: str) -> str:
    """Where the in-process facade dials the core: loopback when bound to every address."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _check_args(args: argparse.Namespace) -> None:
    if not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model directory")
    from astrai_serve.engine.generation_defaults import generation_defaults

    generation_defaults(args.model, args.generation_config)   # a bad --generation-config fails before startup
    for name in ("grpc_port", "http_port"):
        port = getattr(args, name)
        if not 0 <= port <= 65535:
            raise ValueError(f"--{name.replace('_', '-')} {port}: a port must be in [0, 65535]")
    if not 1 <= args.api_server_count <= MAX_API_SERVERS:
        raise ValueError(f"--api-server-count {args.api_server_count}: must be in [1, {MAX_API_SERVERS}]")
    if args.api_server_count > 1 and (args.http_in_process or args.no_http):
        flag = "--http-in-process" if args.http_in_process else "--no-http"
        raise ValueError(f"--api-server-count {args.api_server_count}: more than one facade process "
                         f"cannot go with {flag}")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout}: must be >= 0 seconds")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name must not be empty")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _check_args(args)
        engine_loop = _engine(args, engine_overrides(args))
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"astrai serve: error: {exc}", file=sys.stderr)
        return 2
    api_key = resolve_api_key(args.api_key)
    if not _is_loopback(args.host) and not api_key:
        log.warning("binding %s without an API key: anyone who can reach it may generate", args.host)
    name = args.served_model_name or args.model.resolve().name
    try:
        return asyncio.run(_serve(args, engine_loop, name, api_key))
    except OSError as exc:
        print(f"astrai serve: error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine_loop.stop(10.0)  # a no-op after a clean shutdown; else the engine process must not linger


def _engine(args: argparse.Namespace, overrides: dict[str, Any]) -> Any:
    """The engine, loaded: an EngineProcess (a child process), or an EngineLoop with --engine-in-process."""
    if args.in_process_engine:
        from astrai_serve.engine.llm_engine import LLMEngine  # heavy (torch): after the cheap checks
        from astrai_serve.core.engine_loop import EngineLoop

        return EngineLoop(LLMEngine(args.model, **overrides))
    from astrai_serve.core.engine_process import EngineProcess

    return EngineProcess(args.model, overrides, log_level=args.log_level)


class _FacadeThread:
    """--http-in-process: the facade on a thread of this process, driven like a FacadeProcess."""

    def __init__(self, grpc_target: str, host: str, port: int, api_key: str | None):
        from astrai_serve.facade.server import FacadeServer
        from astrai_serve.facade.app import FacadeConfig

        config = FacadeConfig(grpc_target=grpc_target, api_key=api_key, core_api_key=api_key)
        self.server = FacadeServer(config, host, port, log_level="warning")
        self.url = self.server.url

    async def start(self) -> None:
        self.server.start_in_thread()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def wait(self) -> int:
        await asyncio.Event().wait()  # the thread ends only when stopped
        return 0

    async def stop(self, timeout: float) -> None:
        await asyncio.to_thread(self.server.stop, timeout)


def _facade(args: argparse.Namespace, grpc_target: str, api_key: str | None) -> Any:
    """The REST facade, its HTTP port bound (so a port in use fails before anything starts)."""
    if args.http_in_process:
        return _FacadeThread(grpc_target, args.host, args.http_port, api_key)
    from astrai_serve.facade.process import FacadeProcess

    # uvicorn's own info lines (startup banners) stay out of the daemon's log, as they always have.
    return FacadeProcess(grpc_target, args.host, args.http_port, api_key,
                         log_level="error" if args.log_level == "error" else "warning", count=args.api_server_count)


async def _serve(args: argparse.Namespace, engine_loop: Any, name: str, api_key: str | None) -> int:
    from astrai_serve.core.server import CoreServer, GenerationServicer

    from astrai_serve.engine.generation_defaults import generation_defaults

    defaults = generation_defaults(args.model, args.generation_config)
    if defaults:
        log.info("sampling defaults from %s: %s", args.generation_config, defaults)
    core = CoreServer(GenerationServicer(engine_loop, name, tool_call_parser=args.tool_call_parser,
                                         sampling_defaults=defaults),
                      args.host, args.grpc_port, api_key)
    grpc_target = f"{_connect_host(args.host)}:{core.port}"
    facade = None if args.no_http else _facade(args, grpc_target, api_key)
    engine_loop.start()
    await core.start()
    if facade is not None:
        try:
            await facade.start()
        except OSError:
            await _stop(engine_loop, core, None)
            raise
    signals: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    freeze_startup_heap()      # the gRPC core relays every token: no full-collection pauses there either
    http = f" http={facade.url}" if facade is not None else ""
    print(f"astrai serve: ready grpc={grpc_target}{http} model={name}", flush=True)

    # Serve until a signal, or until the facade process dies: then the HTTP half of the service is
    # gone, and the daemon shuts down (exit 1) for its supervisor to restart rather than run half up.
    first = asyncio.create_task(signals.get())
    facade_exit = asyncio.create_task(facade.wait()) if facade is not None else None
    await asyncio.wait([t for t in (first, facade_exit) if t is not None], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if first.done():
        log.info("received %s: draining for up to %.1fs", signal.Signals(first.result()).name, args.shutdown_timeout)
    else:
        first.cancel()
        code = 1
        log.error("the REST facade process exited (code %s): shutting down, draining for up to %.1fs",
                  facade_exit.result(), args.shutdown_timeout)
    drain = asyncio.create_task(core.drain(args.shutdown_timeout))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if not drain.done():
        drain.cancel()
        log.info("second signal: aborting in-flight requests now")
    if facade_exit is not None:
        facade_exit.cancel()
    await _stop(engine_loop, core, facade)
    log.info("stopped")
    return code


async def _stop(engine_loop: Any, core: Any, facade: Any) -> None:
    # Abort whatever is left; each open stream then ends with finish_reason "abort", which the
    # facade relays before it is stopped.
    await asyncio.to_thread(engine_loop.stop, 10.0)
    await core.stop(grace=2.0)
    if facade is not None:
        await facade.stop(10.0)
