"""`moetandem cloud`: serve layer ranges and expert computations to end devices over gRPC (split execution)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from moetandem.cli.flags import (add_device_args, add_drain_args, add_emulate_args, model_path, non_negative_float,
                                 positive_int)
from moetandem.config import CloudBatchConfig, ModelConfig
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
    g = p.add_argument_group("batching across ends")
    g.add_argument("--batch-window-ms", type=non_negative_float, default=CloudBatchConfig.window_ms, metavar="MS",
                   help="decode exchanges of different ends that queue together run as one forward; a batch "
                        "waits up to MS for the other active ends' exchanges (default %(default)g; 0 = only those "
                        "queued while the cloud was busy)")
    g.add_argument("--batch-max-rows", type=positive_int, default=CloudBatchConfig.max_rows, metavar="N",
                   help="most KV-cache rows (sequences) in one batched forward (default %(default)d; 1 = batching "
                        "off: each session its own KV cache and forwards; always off with --expert-parallel)")
    add_emulate_args(p)
    p.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="shard the experts over N ranks of this host (NCCL on GPUs, gloo on CPU); rank 0 serves")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="N cloud replicas under Ray Serve behind --listen (needs pip install moetandem[cluster])")
    p.add_argument("--report-replicas", type=int, default=1, help=argparse.SUPPRESS)  # set by --replicas N on each
    # replica: the count its hello reports to the ends' schedulers
    add_drain_args(p, "refuse new sessions (ends fall back), let in-flight exchanges finish")
    p.add_argument("--log-level", default="info", choices=["error", "warning", "info", "debug"])
    add_device_args(p)
    p.set_defaults(run=cloud_command)


def cloud_command(args: argparse.Namespace) -> int:
    from moetandem.runtime import build_engine
    from moetandem.split.cloud import CloudServer
    from moetandem.split.transport.auth import read_token

    if args.max_sessions < 1 or args.idle_timeout <= 0 or args.max_session_bytes < 1:
        raise InvalidRequestError("--max-sessions, --idle-timeout and --max-session-bytes must be positive")
    if args.expert_parallel < 1 or args.replicas < 1 or args.report_replicas < 1:
        raise InvalidRequestError("--expert-parallel and --replicas must be >= 1")
    if not args.drain_timeout >= 0:
        raise InvalidRequestError(f"--drain-timeout {args.drain_timeout:g}: must be >= 0 seconds")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    batching = CloudBatchConfig.from_args(args)
    token = read_token(args.token_file)
    stop = threading.Event()

    def on_signal(*_: Any) -> None:
        if stop.is_set():  # a second signal: no more waiting
            print("moetandem cloud: second signal, exiting now", file=sys.stderr, flush=True)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if args.replicas > 1:  # this process is the front; each Ray Serve replica runs `moetandem cloud` (below)
        from moetandem.split.replicas import serve_replicas
        return serve_replicas(args.replicas, replica_argv(sys.argv[1:], args.replicas), args.listen, stop,
                              args.drain_timeout)
    ep, group, device, followers = args.expert_parallel, None, args.device, []
    if ep > 1:
        from moetandem.split import parallel
        followers = parallel.launch_followers(ep) if parallel.launched_rank() is None else []
        group, device = parallel.init_group(args.device)
    try:
        engine = build_engine(ModelConfig(model_path(args), device, args.dtype, compile=args.compile,
                                          long_running=True, expert_parallel=ep > 1,
                                          expert_format=args.expert_format, gpu_memory=args.gpu_memory))
    except BaseException:  # e.g. a rank's share does not fit --gpu-memory: the ranks this one started go too
        for f in followers:
            f.terminate()
        raise
    follower = group is not None and bool(parallel.launched_rank())
    mirror = parallel.Mirror(group) if group is not None and not follower else None
    from moetandem.split.shaper import LinkSpec, PeerShapers
    spec = LinkSpec(args.emulate_rate_mbit, args.emulate_rtt_ms, args.emulate_jitter_ms, args.emulate_loss)
    shaping = PeerShapers(spec) if spec.active else 0.0  # each reply shaped on its end's emulated link
    server = CloudServer(engine, token, args.max_sessions, args.idle_timeout, args.max_session_bytes, shaping,
                         mirror=mirror, replicas=args.report_replicas,
                         batching=batching if ep == 1 else CloudBatchConfig(max_rows=1))
    if follower:
        parallel.gather_expert_bytes(engine.provider)
        parallel.follow(server, group)  # a follower rank: compute what rank 0 is sent, until rank 0 stops
        return 0
    port = server.start(args.listen, args.tls_cert, args.tls_key)
    info: dict[str, Any] = {"listening": port, "fingerprint": server.fingerprint}
    if group is not None:
        info["expert_bytes"] = parallel.gather_expert_bytes(engine.provider)  # per rank
    # one machine-readable line: scripts (tests, bench/split.py) wait for it
    print(json.dumps(info), flush=True)
    while not stop.wait(1.0):  # a timed wait: the signal handler runs promptly on the main thread
        pass
    print(f"moetandem cloud: draining (up to {args.drain_timeout:g} s)", file=sys.stderr, flush=True)
    server.drain(args.drain_timeout)
    if server.runner is not None:
        b = server.batch_stats()
        print(f"moetandem cloud: batching: {b['forwards']:.0f} forwards of {b['exchanges_per_forward']:.2f} exchanges "
              f"on average (at most {b['max_exchanges']:.0f})", file=sys.stderr, flush=True)
    if mirror is not None:
        mirror.stop()
        for f in followers:
            f.wait(timeout=30)
    print("moetandem cloud: stopped", file=sys.stderr)
    return 0


def replica_argv(argv: list[str], replicas: int = 1) -> list[str]:
    """This command line for one replica: without --replicas and --listen (a replica picks its own port), telling
    it to report `replicas` to the ends."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--replicas", "--listen"):
            skip = True
        elif not a.startswith(("--replicas=", "--listen=")):
            out.append(a)
    return [*out, "--report-replicas", str(replicas)]
