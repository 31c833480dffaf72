"""`moetandem trace`: record expert routing on a text and measure its locality (files and plots)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moetandem.cli.flags import add_device_args, model_path, positive_int, read_text
from moetandem.errors import InvalidRequestError


def register(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("trace", help="record expert routing on a text and measure its locality",
                       description="Writes trace.safetensors, summary.json, summary.md and PNG plots to --out.")
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: the shipped demo MoE)")
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to route")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--context", type=positive_int, default=256, metavar="N", help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N", help="trace the first N tokens only")
    add_device_args(p)
    p.set_defaults(run=trace_command)
    return p


def trace_command(args: argparse.Namespace) -> int:
    text = read_text(args.data)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out} is a file; pass a directory")
    from moetandem.analysis.eval import encode_text
    from moetandem.analysis.trace import trace_ids
    from moetandem.config import ModelConfig
    from moetandem.runtime import build_engine
    engine = build_engine(ModelConfig(model_path(args), args.device, args.dtype, use_graphs=False,
                                      gpu_memory=args.gpu_memory))
    tr = trace_ids(engine, encode_text(engine, text, args.max_tokens), context=args.context)
    tr.save(out, progress=True)
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out}/trace.safetensors, summary.json, summary.md and plots "
          f"({', '.join(p.name for p in sorted(out.glob('*.png')))})", file=sys.stderr)
    return 0
