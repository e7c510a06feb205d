"""`astrai gateway`: only the OpenAI REST facade, in front of a gRPC core running elsewhere.

    astrai gateway --grpc-target HOST:PORT [--host 127.0.0.1] [--http-port 8000]
                   [--api-key KEY | env ASTRAI_API_KEY] [--core-api-key KEY]

It loads no model and imports no torch: everything, the model name included, comes from the
core over gRPC. uvicorn owns the signals here; SIGTERM finishes open responses and exits 0.

`astrai serve` runs its REST facade as this command in a child process, with `--http-fd` (the
socket the daemon bound) and `--stop-on-stdin-eof` (the daemon decides when it stops).
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys

from astrai_serve.auth import API_KEY_ENV, resolve_api_key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grpc-target", required=True, help="HOST:PORT of the gRPC core (`astrai serve --no-http`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind to (default: loopback only)")
    parser.add_argument("--http-port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' from HTTP clients (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--core-api-key", default=None, help="key to send to the core (default: the same as --api-key)")
    parser.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                        help="larger request bodies are refused with 413 (default 4 MiB)")
    parser.add_argument("--http-fd", type=int, default=None,
                        help="serve on this inherited, already listening socket instead of binding --host/--http-port "
                             "(how `astrai serve` hands its facade child the port it bound)")
    parser.add_argument("--stop-on-stdin-eof", action="store_true",
                        help="ignore SIGINT/SIGTERM and stop when stdin closes (how `astrai serve` runs its facade "
                             "child, which thus never outlives it)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity")


def run(args: argparse.Namespace) -> int:
    from astrai_serve.child_process import freeze_startup_heap
    from astrai_serve.facade.server import FacadeServer
    from astrai_serve.facade.app import FacadeConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = resolve_api_key(args.api_key)
    try:
        if not 0 <= args.http_port <= 65535:
            raise ValueError(f"--http-port {args.http_port}: a port must be in [0, 65535]")
        config = FacadeConfig(grpc_target=args.grpc_target, api_key=api_key,
                              core_api_key=args.core_api_key if args.core_api_key is not None else api_key,
                              max_body_bytes=args.max_body_bytes)
        sock = socket.socket(fileno=args.http_fd) if args.http_fd is not None else None
        server = FacadeServer(config, args.host, args.http_port, log_level=args.log_level, sock=sock)
    except (ValueError, OSError) as exc:
        print(f"astrai gateway: error: {exc}", file=sys.stderr)
        return 2
    print(f"astrai gateway: ready http={server.url} grpc_target={args.grpc_target}", flush=True)
    freeze_startup_heap()      # the facade relays every streamed chunk: no full-collection pauses
    server.run(stop_on_stdin_eof=args.stop_on_stdin_eof)
    return 0
