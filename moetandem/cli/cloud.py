"""`moetandem cloud`: serve layer ranges and expert computations to end devices over gRPC (split execution)."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from moetandem.cli.flags import add_device_args, add_emulate_args, model_path
from moetandem.config import ModelConfig
from moetandem.errors import InvalidRequestError


def register(sub: Any) -> None:
    p = sub.add_parser("cloud", help="serve layers and experts to end devices (split execution, gRPC)",
                       description="Load a checkpoint once and serve layer ranges (each end session with its own "
                                   "KV cache) and expert computations to many end devices over gRPC.")
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--listen", default="127.0.0.1:50051", metavar="HOST:PORT", help="default 127.0.0.1:50051")
    p.add_argument("--token-file", required=True, metavar="FILE", help="file holding the token ends must send")
    p.add_argument("--tls-cert", metavar="PEM", help="TLS certificate chain (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="TLS private key")
    p.add_argument("--max-sessions", type=int, default=16, metavar="N", help="concurrent end sessions (16)")
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S", help="free idle sessions after S s")
    p.add_argument("--max-session-bytes", type=int, default=2**30, metavar="BYTES", help="KV cache per session")
    add_emulate_args(p)
    p.add_argument("--log-level", default="info", choices=["error", "warning", "info", "debug"])
    add_device_args(p)
    p.set_defaults(run=cloud_command)


def cloud_command(args: argparse.Namespace) -> int:
    from moetandem.runtime import build_engine
    from moetandem.split.cloud import CloudServer
    from moetandem.split.transport.auth import read_token

    if args.max_sessions < 1 or args.idle_timeout <= 0 or args.max_session_bytes < 1:
        raise InvalidRequestError("--max-sessions, --idle-timeout and --max-session-bytes must be positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    token = read_token(args.token_file)
    engine = build_engine(ModelConfig(model_path(args), args.device, args.dtype, compile=args.compile,
                                      long_running=True))
    from moetandem.split.shaper import LinkSpec, PeerShapers
    spec = LinkSpec(args.emulate_rate_mbit, args.emulate_rtt_ms, args.emulate_jitter_ms, args.emulate_loss)
    shaping = PeerShapers(spec) if spec.active else 0.0  # each reply shaped on its end's emulated link
    server = CloudServer(engine, token, args.max_sessions, args.idle_timeout, args.max_session_bytes, shaping)
    port = server.start(args.listen, args.tls_cert, args.tls_key)
    # one machine-readable line: scripts (tests, bench/split.py) wait for it
    print(json.dumps({"listening": port, "fingerprint": server.fingerprint}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2)
    print("moetandem cloud: stopped", file=sys.stderr)
    return 0
