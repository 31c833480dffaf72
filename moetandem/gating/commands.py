"""CLI pieces of hardware-aware gating: `moetandem profile`, `moetandem calibrate --group-gate`, --gate flags."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from moetandem.errors import InvalidRequestError


def add_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hardware-aware gate")
    g.add_argument("--gate", choices=("off", "masked", "group"), default="off",
                   help="route to the experts that are local now: group = learned group gate (after `moetandem "
                        "calibrate --group-gate`), masked = router restricted to them; off = original (default)")
    g.add_argument("--gate-cost", type=_cost, default=math.inf, metavar="C",
                   help="gate weight above which a non-local expert the router picked is still used "
                        "(default inf: local experts only; 0 keeps every original pick)")
    g.add_argument("--gate-latency-budget", type=float, default=0.0, metavar="S",
                   help="seconds per layer and step that non-resident experts may take and still count as local")


def gate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"gate": args.gate, "gate_cost": args.gate_cost, "gate_latency_budget": args.gate_latency_budget}


def add_group_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("group gate (`--group-gate`)")
    g.add_argument("--group-gate", action="store_true", help="train the group gates by distillation on --data "
                   "(model frozen) and write moetandem-group-gate.safetensors next to the checkpoint")
    g.add_argument("--gate-rank", type=int, default=16, help="hidden-state rank of each gate (default 16)")
    g.add_argument("--gate-steps", type=int, default=800, help="training steps per layer (default 800)")
    g.add_argument("--gate-rows", type=int, default=4096, help="calibration rows per layer (default 4096)")


def gate_calibrate(args: argparse.Namespace, model: Path) -> int:
    from moetandem.engine import Engine
    from moetandem.experts.commands import read_text, token_windows
    from moetandem.gating.group_gate import save_gates
    from moetandem.gating.train import train_gates
    if not args.data:
        raise InvalidRequestError("--group-gate trains on calibration text: add --data FILE (not your eval text)")
    if args.gate_rank < 1 or args.gate_steps < 1 or args.gate_rows < 64:
        raise InvalidRequestError("need --gate-rank >= 1, --gate-steps >= 1 and --gate-rows >= 64")
    engine = Engine.from_pretrained(model, device=args.device, dtype=args.dtype)
    texts = [engine.decode_text(w) or "" for w in token_windows(engine, read_text(args.data), 256, None)]
    gates, reports = train_gates(engine, texts, rows=args.gate_rows, rank=args.gate_rank, steps=args.gate_steps)
    path = save_gates(engine.store.ckpt, gates, {"trained_on": Path(args.data).name})
    print("| layer | gate params | masked gating error | group gate error | train s |\n|---|---|---|---|---|")
    for r in reports:
        print(f"| {r.layer} | {r.params} | {r.masked_error:.4f} | {r.gate_error:.4f} | {r.train_s:.1f} |")
    print(f"wrote {path} (held-out relative error of the MoE layer output under random local sets)", file=sys.stderr)
    return 0


def add_profile_parser(sub: Any, common: Any) -> None:
    from moetandem.experts.commands import add_committee_args
    p = sub.add_parser("profile", help="measure this device: memory, expert FFN and fetch times, load",
                       description="Prints the live device profile the gate and the cost model use; --json "
                       "writes it.")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (default 5)")
    common(p)
    add_committee_args(p)
    p.set_defaults(run=profile_command)


def profile_command(args: argparse.Namespace) -> int:
    from moetandem.engine import Engine
    from moetandem.experts.commands import _model, committee_kwargs
    from moetandem.gating.profile import measure_profile
    if args.reps < 1:
        raise InvalidRequestError("--reps must be >= 1")
    kw = committee_kwargs(args)
    kw.update(gate="off")
    engine = Engine.from_pretrained(_model(args), device=args.device, dtype=args.dtype, **kw)
    prof = measure_profile(engine, reps=args.reps)
    print(prof.table())
    if args.json:
        prof.save(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _cost(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (use inf for local experts only)") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the gate cost must be >= 0, got {text}")
    return value
