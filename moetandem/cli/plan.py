"""`moetandem plan`: per-layer committee slots and refresh interval for a budget, fitted to calibration text."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from moetandem.cli.calibrate import token_windows
from moetandem.cli.flags import add_device_args, budget_arg, model_path, read_text


def register(sub: Any) -> None:
    p = sub.add_parser("plan", help="choose per-layer committee slots and refresh interval for a budget")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--expert-budget", required=True, type=budget_arg, metavar="B", help="bytes (6GiB) or fraction (0.5)")
    p.add_argument("--data", required=True, help="calibration text whose routing the plan is fitted to")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens to route (default 4096)")
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    add_device_args(p)
    p.set_defaults(run=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    import torch

    from moetandem.analysis.trace import recording
    from moetandem.config import ModelConfig, parse_budget
    from moetandem.experts.budget import total_expert_bytes
    from moetandem.experts.plan import make_plan
    from moetandem.runtime import build_engine
    text = read_text(args.data)
    from moetandem.experts.formats import resolve
    fmt_name = getattr(args, "expert_format", "auto")
    engine = build_engine(ModelConfig(model_path(args), args.device, args.dtype, expert_format=fmt_name,
                                      gpu_memory=args.gpu_memory))
    store = engine.store
    fmt = resolve(fmt_name, store, engine.dtype, engine.device)  # slots hold this format's bytes
    budget = parse_budget(args.expert_budget, total_expert_bytes(store, engine.dtype))
    with recording(engine) as rec, torch.inference_mode():
        for w in token_windows(engine, text, 256, args.max_tokens):
            rec.engine.generate([w], max_new_tokens=1)
    plan = make_plan(rec.routing(), store.num_experts, engine.args.top_k, fmt.nbytes, budget)
    plan.save(args.out)
    print("| refresh every | planned hit rate | uniform hit rate | swaps/token |\n|---|---|---|---|")
    for c in plan.candidates:
        print(f"| {c['refresh_every']} | {c['planned_hit_rate']:.3f} | {c['uniform_hit_rate']:.3f} | "
              f"{c['swaps_per_token']:.2f} |")
    print(f"wrote {args.out}: slots {plan.slots}, refresh every {plan.refresh_every}", file=sys.stderr)
    return 0
