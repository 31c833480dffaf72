"""`moetandem profile`: the live device profile the gate and the cost model use."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from moetandem.cli.flags import add_committee_args, add_device_args, configs, model_path
from moetandem.config import GateConfig
from moetandem.errors import InvalidRequestError


def register(sub: Any) -> None:
    p = sub.add_parser("profile", help="measure this device: memory, expert FFN and fetch times, load",
                       description="Prints the live device profile the gate and the cost model use; --json "
                       "writes it.")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--json", metavar="FILE", help="also write the profile as JSON")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (default 5)")
    add_device_args(p)
    add_committee_args(p)
    p.set_defaults(run=profile_command)


def profile_command(args: argparse.Namespace) -> int:
    if args.reps < 1:
        raise InvalidRequestError("--reps must be >= 1")
    model, committee, _, _ = configs(args, model_path(args))
    from moetandem.gating.profile import measure_profile
    from moetandem.runtime import build_engine
    engine = build_engine(model, committee, GateConfig())
    prof = measure_profile(engine, reps=args.reps)
    print(prof.table())
    if args.json:
        prof.save(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
