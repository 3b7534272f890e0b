"""``ckpt-coordinator --listen HOST:PORT --state-dir DIR``: run the coordinator until SIGTERM/SIGINT.

Prints one line ``listening on HOST:PORT`` (the real port when ``:0`` was asked) once serving.
The token is read from ``--token-file`` or the ``CKPT_COORDINATOR_TOKEN`` environment variable
(never from the command line, where other users could read it). Run as
``python -m recovery --listen ...`` until the ``ckpt-coordinator`` script is declared.

``--metrics-port N`` serves Prometheus metrics on ``--metrics-host`` (default loopback) and prints
``metrics on HOST:PORT``; ``--log-format json`` writes one JSON object per log line.
``python -m recovery plan --address HOST:PORT --job J --layout tp=..,dp=.. [--explain]`` is the
client that prints a restore plan (``recovery._client``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Optional

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt-coordinator", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="HOST:PORT to serve on (PORT 0 picks a free one)")
    p.add_argument("--state-dir", required=True, type=Path, help="directory of the SQLite registry")
    p.add_argument("--heartbeat-interval-ms", type=int, default=500)
    p.add_argument("--heartbeat-timeout-ms", type=int, default=2500)
    p.add_argument("--token-file", type=Path, help="file holding the shared token (else $CKPT_COORDINATOR_TOKEN)")
    p.add_argument("--tls-key", type=Path, help="PEM private key (with --tls-cert: serve TLS)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    return p


def _setup_logging(fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from recovery._logging import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:
        from recovery._client import plan_main

        return plan_main(argv[1:])
    args = _parser().parse_args(argv)
    _setup_logging(args.log_format)
    from recovery.server import build_server  # grpc is imported only when serving

    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("CKPT_COORDINATOR_TOKEN") or None
    tls = None
    if args.tls_key or args.tls_cert:
        if not (args.tls_key and args.tls_cert):
            print("ckpt-coordinator: --tls-key and --tls-cert go together", file=sys.stderr)
            return 2
        tls = (args.tls_key.read_bytes(), args.tls_cert.read_bytes())
    server, port = build_server(args.listen, state_dir=args.state_dir, token=token, tls=tls,
                                interval=timedelta(milliseconds=args.heartbeat_interval_ms),
                                timeout=timedelta(milliseconds=args.heartbeat_timeout_ms),
                                metrics_bind=None if args.metrics_port is None else f"{args.metrics_host}:{args.metrics_port}")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    print(f"listening on {host}:{port}", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on {args.metrics_host}:{server.metrics_port}", flush=True)
    done.wait()
    server.stop(5)
    return 0
