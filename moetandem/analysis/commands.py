"""CLI handlers: `moetandem eval` (perplexity, agreement with an all-resident reference) and `moetandem trace`
(routing trace and the PC-MoE locality observations)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from moetandem.errors import InvalidRequestError

Common = Callable[[argparse.ArgumentParser], None]


def _common(common: Common | None) -> Common:
    if common is None:  # the shared --device / --dtype flags of the main CLI
        from moetandem.cli import add_device_args
        return add_device_args
    return common


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_eval_parser(sub: Any, common: Common | None = None) -> argparse.ArgumentParser:
    from moetandem.experts.commands import add_committee_args
    p = sub.add_parser("eval", help="perplexity on a text file (and agreement with all experts resident)",
                       description="Perplexity over non-overlapping windows of --context tokens. With --reference, "
                       "an all-resident copy of the model runs the same windows: top-1 agreement and KL.")
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: the shipped demo MoE)")
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to evaluate on")
    p.add_argument("--context", type=_positive, default=256, metavar="N", help="tokens per window (default 256)")
    p.add_argument("--step", type=_positive, metavar="N", help="feed each window in pieces of N tokens over a KV "
                   "cache (1 = as in decoding; default: whole windows)")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="evaluate the first N tokens only")
    p.add_argument("--reference", action="store_true", help="compare with the model with every expert resident")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON")
    _common(common)(p)
    add_committee_args(p)
    p.set_defaults(run=eval_command)
    return p


def add_trace_parser(sub: Any, common: Common | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser("trace", help="record expert routing on a text and measure its locality",
                       description="Writes trace.safetensors, summary.json, summary.md and PNG plots to --out.")
    p.add_argument("--model", metavar="PATH", help="checkpoint directory (default: the shipped demo MoE)")
    p.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file to route")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--context", type=_positive, default=256, metavar="N", help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="trace the first N tokens only")
    _common(common)(p)
    p.set_defaults(run=trace_command)
    return p


def _model_path(args: argparse.Namespace) -> Path:
    from moetandem.assets import demo_model_path
    return Path(args.model) if args.model else demo_model_path()


def eval_command(args: argparse.Namespace) -> int:
    from moetandem.analysis.eval import encode_text, evaluate_ids
    from moetandem.engine import Engine
    from moetandem.experts.commands import committee_kwargs, read_text
    text = read_text(args.data)  # a missing file fails before any weights load
    path = _model_path(args)
    engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, **committee_kwargs(args))
    ids = encode_text(engine, text, args.max_tokens)
    reference = None
    if args.reference:
        if args.expert_budget or args.plan:
            reference = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, use_graphs=False)
        else:
            print("[moetandem] every expert is resident already; the reference is the engine itself",
                  file=sys.stderr)
            reference = engine
    res = evaluate_ids(engine, ids, context=args.context, step=args.step, reference=reference)
    print(format_result(res, committee=_describe(args)))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(path), "data": args.data, "committee": _describe(args),
                                   **res.as_dict()}, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _describe(args: argparse.Namespace) -> str:
    if not args.expert_budget and not args.plan:
        return "all resident"
    how = f"policy {args.policy}" if args.policy else f"fidelity {args.fidelity}"
    return f"budget {args.expert_budget or 'plan'}, {how}"


def format_result(res: Any, committee: str = "") -> str:
    """A short markdown table of an EvalResult."""
    rows = [("experts", committee), ("tokens", f"{res.tokens} in {res.windows} windows of {res.context}"),
            ("feeding", "whole windows" if res.step is None else f"pieces of {res.step}"),
            ("perplexity", f"{res.perplexity:.4f}"), ("nll (nats/token)", f"{res.nll:.4f}")]
    if res.top1_agreement is not None:
        rows += [("reference perplexity", f"{res.reference_perplexity:.4f}"),
                 ("top-1 agreement", f"{res.top1_agreement:.4f}"), ("mean KL(reference, engine), nats", f"{res.mean_kl:.5f}")]
    s = res.expert_stats
    if s:
        rows += [("committee hit rate", f"{s.get('hit_rate', 0.0):.3f}"),
                 ("misses: skip / substitute / fetch / host", f"{int(s.get('skips', 0))} / "
                  f"{int(s.get('substitutions', 0))} / {int(s.get('fetches', 0))} / {int(s.get('host_computes', 0))}"),
                 ("swaps", f"{int(s.get('swaps', 0))}")]
    rows += [("engine time", f"{res.engine_s:.2f} s ({res.tokens / max(res.engine_s, 1e-9):.1f} tok/s)"),
             ("wall time", f"{res.wall_s:.2f} s")]
    rows = [(k, v) for k, v in rows if v]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def trace_command(args: argparse.Namespace) -> int:
    from moetandem.analysis.eval import encode_text
    from moetandem.analysis.trace import trace_ids
    from moetandem.engine import Engine
    from moetandem.experts.commands import read_text
    text = read_text(args.data)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InvalidRequestError(f"--out {out} is a file; pass a directory")
    engine = Engine.from_pretrained(_model_path(args), device=args.device, dtype=args.dtype, use_graphs=False)
    tr = trace_ids(engine, encode_text(engine, text, args.max_tokens), context=args.context)
    tr.save(out, progress=True)
    print((out / "summary.md").read_text(), end="")
    print(f"wrote {out}/trace.safetensors, summary.json, summary.md and plots "
          f"({', '.join(p.name for p in sorted(out.glob('*.png')))})", file=sys.stderr)
    return 0
