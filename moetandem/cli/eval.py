"""`moetandem eval`: perplexity on a text, and agreement with an all-resident reference."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from moetandem.cli.flags import add_committee_args, add_device_args, configs, model_path, read_text
from moetandem.cli.flags import positive_int as _positive


def register(sub: Any) -> argparse.ArgumentParser:
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
    add_device_args(p)
    add_committee_args(p)
    p.set_defaults(run=eval_command)
    return p


def eval_command(args: argparse.Namespace) -> int:
    text = read_text(args.data)  # a missing file fails before any weights load
    path = model_path(args)
    cfgs = configs(args, path)
    from moetandem.analysis.eval import encode_text, evaluate_ids
    from moetandem.config import ModelConfig
    from moetandem.runtime import build_engine
    engine = build_engine(*cfgs)
    ids = encode_text(engine, text, args.max_tokens)
    reference = None
    if args.reference:
        quantizes = args.expert_format not in ("auto", "bf16")  # then the reference holds bf16 experts
        if args.expert_budget or args.plan or quantizes:
            reference = build_engine(ModelConfig(path, args.device, args.dtype, use_graphs=False,
                                                 expert_format="bf16" if quantizes else "auto",
                                                 gpu_memory=args.gpu_memory))
        else:
            print("[moetandem] every expert is resident already; the reference is the engine itself",
                  file=sys.stderr)
            reference = engine
    if engine.seq2seq:
        print("[moetandem] text-to-text model: each window's second half is scored as the target of its first half "
              "(the encoder's input); perplexity is of the target given the source", file=sys.stderr)
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
    fmt = "" if args.expert_format == "auto" else f" ({args.expert_format})"
    if not args.expert_budget and not args.plan:
        return "all resident" + fmt
    how = f"policy {args.policy}" if args.policy else f"fidelity {args.fidelity}"
    miss = "" if getattr(args, "miss_format", "bf16") == "bf16" else f", {args.miss_format} misses"
    if getattr(args, "miss_reads", None) is not None:
        miss += f", <= {args.miss_reads} miss reads"
    return f"budget {args.expert_budget or 'plan'}, {how}{fmt}{miss}"


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
