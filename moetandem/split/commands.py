"""CLI pieces of split execution: the end's flags (`generate` / `serve` --cloud ...) and `moetandem cloud`."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moetandem.errors import InvalidRequestError
from moetandem.split.wire import CODECS


def add_split_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split execution (end side; the cloud runs `moetandem cloud`)")
    g.add_argument("--cloud", metavar="HOST:PORT", help="run the middle layers on this moetandem cloud server")
    g.add_argument("--token-file", metavar="FILE", help="file holding the cloud's token (needed with --cloud)")
    g.add_argument("--split-plan", metavar="FILE", help="JSON with end_layers_head, end_layers_tail, cloud_experts, "
                   "codec_rank, micro_batches (default: 1 head + 1 tail layer on the end)")
    g.add_argument("--split-head", type=int, metavar="A", help="layers [0, A) on the end (overrides the plan)")
    g.add_argument("--split-tail", type=int, metavar="B", help="the last B layers on the end (overrides the plan)")
    g.add_argument("--codec", choices=CODECS + ("plan",), default="off", help="activations on the link: off = "
                   "raw (exact), fp16, lowrank (needs `moetandem calibrate --codec`), plan = the plan's rank")
    g.add_argument("--codec-rank", type=int, metavar="R", help="rank of the low-rank codec")
    g.add_argument("--micro-batches", type=int, metavar="M", help="micro-batches in flight (pipelining)")
    g.add_argument("--tls-ca", metavar="PEM", help="use TLS to the cloud, trusting this CA / self-signed cert")
    g.add_argument("--cloud-timeout", type=float, default=30.0, metavar="S", help="deadline of one exchange (30)")
    g.add_argument("--emulate-rtt-ms", type=float, default=0.0, metavar="MS",
                   help="add this round-trip time in the application layer (half per direction), for tests")


def split_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.from_pretrained keywords for the split flags ({} without --cloud)."""
    if not getattr(args, "cloud", None):
        return {}
    from moetandem.split.end import check_address
    from moetandem.split.transport.auth import read_token
    check_address(args.cloud)  # fail before the weights load
    if args.token_file is None:
        raise InvalidRequestError("--cloud needs --token-file (the file holding the cloud's token)")
    read_token(args.token_file)
    split: dict[str, Any] = {"plan": args.split_plan, "head": args.split_head, "tail": args.split_tail,
                             "codec": args.codec, "codec_rank": args.codec_rank, "micro_batches": args.micro_batches,
                             "timeout_s": args.cloud_timeout, "emulate_rtt_ms": args.emulate_rtt_ms}
    if args.tls_ca:
        split.update(tls=True, tls_ca=args.tls_ca)
    return {"cloud": args.cloud, "token_file": args.token_file, "split": split}


def format_split_stats(s: dict[str, float]) -> str:
    return (f"[moetandem] split: {int(s['cloud_forwards'])} forwards via the cloud, {int(s['local_forwards'])} on "
            f"the end | fallbacks {int(s['fallbacks'])}, link losses {int(s['link_losses'])}, rebuilt "
            f"{int(s['rebuilt_tokens'])} tok | link {s['bytes_sent'] / 1e3:.1f} kB up, {s['bytes_received'] / 1e3:.1f} "
            f"kB down in {int(s['exchanges'])} exchanges | RTT {s['rtt_s'] * 1e3:.2f} ms")


def add_cloud_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
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
    p.add_argument("--emulate-rtt-ms", type=float, default=0.0, metavar="MS",
                   help="delay each reply by MS/2 (application-layer RTT emulation)")
    p.add_argument("--log-level", default="info", choices=["error", "warning", "info", "debug"])
    common(p)
    p.set_defaults(run=cloud_command)


def cloud_command(args: argparse.Namespace) -> int:
    from moetandem.assets import demo_model_path
    from moetandem.engine import Engine
    from moetandem.split.cloud import CloudServer
    from moetandem.split.transport.auth import read_token

    if args.max_sessions < 1 or args.idle_timeout <= 0 or args.max_session_bytes < 1:
        raise InvalidRequestError("--max-sessions, --idle-timeout and --max-session-bytes must be positive")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    token = read_token(args.token_file)
    engine = Engine.from_pretrained(Path(args.model) if args.model else demo_model_path(), device=args.device,
                                    dtype=args.dtype, progress=True)
    server = CloudServer(engine, token, args.max_sessions, args.idle_timeout, args.max_session_bytes,
                         args.emulate_rtt_ms / 2000.0)
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
