"""`moetandem serve [MODEL]`: the OpenAI-compatible server."""
from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path
from typing import Any

from moetandem.cli.flags import (add_committee_args, add_device_args, add_drain_args, add_split_args, configs,
                                 non_negative_int, positive_int)
from moetandem.config import ServeConfig
from moetandem.errors import MoetandemError


def register(subparsers: Any, **parser_kwargs: Any) -> argparse.ArgumentParser:
    """Add `serve` to `subparsers` (also used by `python -m moetandem.serve`)."""
    p = subparsers.add_parser(
        "serve", **parser_kwargs, help="OpenAI-compatible HTTP server (chat, completions, streaming, metrics)",
        description="Serve a checkpoint over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /metrics. Requests share decode steps (continuous batching).")
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="Hugging Face checkpoint directory (default: the shipped demo MoE)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key-file", type=Path, metavar="FILE",
                   help="file holding the API key; clients must then send 'Authorization: Bearer KEY' "
                        "(everything but /health)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="model id in the API (default: the checkpoint directory's name)")
    add_device_args(p)
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                   help="sequences decoded together = KV-cache slots (default 8)")
    p.add_argument("--max-waiting", type=non_negative_int, default=64, metavar="N",
                   help="sequences queued for a slot before new requests get 429 (default 64)")
    p.add_argument("--max-model-len", type=positive_int, metavar="TOKENS",
                   help="context per sequence, prompt + completion (default: the model's maximum)")
    add_drain_args(p, "stop admitting, let running requests finish (the rest end with an error event and [DONE])")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_committee_args(p)  # --expert-budget, --policy, --fidelity, ... (the engine's Parameter Committee)
    add_split_args(p)  # --cloud HOST:PORT --token-file F ... (split execution, moetandem/split)
    p.set_defaults(run=serve_command)
    return p


def serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from moetandem.serve.app import create_app
        from moetandem.serve.server_thread import DrainingServer
    except ImportError as e:
        raise MoetandemError(f"`moetandem serve` needs the server dependencies ({e.name} is missing): "
                             "pip install fastapi uvicorn prometheus-client") from None
    path = Path(args.model) if args.model else _demo_path()
    cfgs = configs(args, path, long_running=True)  # bad flags fail now, before the server starts
    serve_cfg = ServeConfig.from_args(args)
    from moetandem.checkpoint import Checkpoint
    from moetandem.engine import Engine
    from moetandem.runtime import build_engine

    ckpt = Checkpoint(path)  # a wrong path fails now, before the server starts
    from moetandem.models import get_family
    from moetandem.runtime import check_seq2seq
    if get_family(ckpt.config.get("model_type")).seq2seq:  # refused now, not as a failed background load
        check_seq2seq(str(ckpt.config["model_type"]), cfgs[0], cfgs[2], cfgs[3])
    if cfgs[3] is not None:  # a cloud that refuses us (token, checkpoint, TLS) is exit 2 now, not a 503 later
        from moetandem.split.connect import preflight
        preflight(ckpt, cfgs[3])
    if cfgs[0].gpu_memory is not None:  # no CUDA, or a cap above the GPU: exit 2 now, not a failed background load
        from moetandem.engine import resolve_device
        from moetandem.gpu_memory import MemoryCap
        MemoryCap.apply(cfgs[0].gpu_memory, resolve_device(cfgs[0].device))
    api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    name = args.served_model_name or path.resolve().name

    def load() -> Engine:
        return build_engine(*cfgs)

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(loader=load, model_id=name, api_key=api_key, max_batch=serve_cfg.max_batch,
                     max_waiting=serve_cfg.max_waiting, max_model_len=serve_cfg.max_model_len,
                     drain_timeout=serve_cfg.drain_timeout_s)
    sock = listen_socket(serve_cfg.host, serve_cfg.port)  # a busy port is a one-line error, before any loading
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    print(f"moetandem: serving {name!r} on http://{args.host}:{sock.getsockname()[1]} (model loading; "
          "GET /health says when it is ready)", file=sys.stderr, flush=True)
    DrainingServer(config).run(sockets=[sock])  # drains in-flight streams before uvicorn's own shutdown
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MoetandemError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def read_api_key(file: Path) -> str:
    try:
        key = file.expanduser().read_text(encoding="utf-8").strip()
    except OSError as e:
        raise MoetandemError(f"cannot read the API key file {file}: {e.strerror or e}") from None
    if not key or any(c.isspace() for c in key):
        raise MoetandemError(f"the API key file {file} must hold one key: non-empty, no spaces")
    return key


def _demo_path() -> Path:
    from moetandem.errors import CheckpointError
    try:
        from moetandem.assets import demo_model_path
        return Path(demo_model_path())
    except (ImportError, CheckpointError):
        raise MoetandemError("no MODEL given and this install does not ship the demo model; pass a checkpoint "
                             "directory: moetandem serve PATH") from None


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {v}")
    return v
