"""CLI pieces of the committee: the shared budget/policy flags, `moetandem calibrate` and `moetandem plan`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moetandem.errors import InvalidRequestError
from moetandem.experts.policies import BASELINES, FIDELITY, POLICIES


def add_committee_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expert budget (Parameter Committee)")
    g.add_argument("--expert-budget", metavar="B", help="device bytes for experts (6GiB, 512MB) or a fraction of "
                   "all expert bytes (0.5); default: every expert resident")
    g.add_argument("--policy", choices=POLICIES + BASELINES, help="what a non-resident expert gets (overrides "
                   "--fidelity): auto/fetch/host are exact; substitute, skip; baselines lru, static, host-only")
    g.add_argument("--fidelity", choices=FIDELITY, default="balanced", help="exact | balanced | fast (default "
                   "balanced: skip misses below τ=0.05, substitute close experts, fetch/host the rest)")
    g.add_argument("--skip-threshold", type=float, metavar="TAU", help="gate weight below which experts are skipped")
    g.add_argument("--refresh-every", type=int, default=16, metavar="N", help="committee refresh interval (tokens)")
    g.add_argument("--plan", metavar="FILE", help="plan from `moetandem plan` (per-layer slots, refresh interval)")
    from moetandem.gating.commands import add_gate_args
    add_gate_args(p)


def committee_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from moetandem.gating.commands import gate_kwargs
    return {"expert_budget": args.expert_budget, "policy": args.policy, "fidelity": args.fidelity,
            "skip_threshold": args.skip_threshold, "refresh_every": args.refresh_every, "plan": args.plan,
            **gate_kwargs(args)}


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise InvalidRequestError(f"data file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise InvalidRequestError(f"data file {p} is empty")
    return text


def token_windows(engine: Any, text: str, window: int, max_tokens: int | None) -> list[list[int]]:
    ids = engine.encode(text)[: max_tokens or None]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def add_calibrate_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser("calibrate", help="compute expert norms and similarity for substitution",
                       description="Writes moetandem-calibration.safetensors next to the checkpoint (or to "
                       "~/.cache/moetandem when it is read-only).")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--data", help="calibration text: similarity of expert outputs on it (default: of weights)")
    p.add_argument("--rows", type=int, default=512, help="calibration rows per layer (default 512)")
    from moetandem.split.codec_command import add_codec_args
    add_codec_args(p)
    from moetandem.gating.commands import add_group_gate_args
    add_group_gate_args(p)
    common(p)
    p.set_defaults(run=calibrate_command)


def calibrate_command(args: argparse.Namespace) -> int:
    from moetandem.engine import Engine
    from moetandem.experts.similarity import output_calibration, save_calibration, weight_calibration
    if args.codec:
        from moetandem.split.codec_command import codec_calibrate
        return codec_calibrate(args, _model(args))
    if args.group_gate:
        from moetandem.gating.commands import gate_calibrate
        return gate_calibrate(args, _model(args))
    engine = Engine.from_pretrained(_model(args), device=args.device, dtype=args.dtype)
    if args.data:
        texts = [engine.decode_text(w) or "" for w in token_windows(engine, read_text(args.data), 256, None)]
        sim, norms = output_calibration(engine, texts, rows=args.rows)
        source = "outputs"
    else:
        sim, norms = weight_calibration(engine.store)
        source = "weights"
    path = save_calibration(engine.store.ckpt, sim, norms, source)
    print(f"wrote {path} (similarity of expert {source}, {len(sim)} layers)")
    return 0


def add_plan_parser(sub: Any, common: Any) -> None:
    p = sub.add_parser("plan", help="choose per-layer committee slots and refresh interval for a budget")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--expert-budget", required=True, metavar="B", help="bytes (6GiB) or fraction (0.5)")
    p.add_argument("--data", required=True, help="calibration text whose routing the plan is fitted to")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens to route (default 4096)")
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    common(p)
    p.set_defaults(run=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    import torch

    from moetandem.engine import Engine
    from moetandem.experts.factory import parse_budget
    from moetandem.analysis.trace import recording
    from moetandem.experts.plan import make_plan
    engine = Engine.from_pretrained(_model(args), device=args.device, dtype=args.dtype)
    store = engine.store
    total = store.expert_bytes(engine.dtype) * store.num_experts * len(store.layers)
    budget = parse_budget(args.expert_budget, total)
    with recording(engine) as rec, torch.inference_mode():
        for w in token_windows(engine, read_text(args.data), 256, args.max_tokens):
            engine.generate([w], max_new_tokens=1)
    plan = make_plan(rec.routing(), store.num_experts, engine.args.top_k, store.expert_bytes(engine.dtype), budget)
    plan.save(args.out)
    print("| refresh every | planned hit rate | uniform hit rate | swaps/token |\n|---|---|---|---|")
    for c in plan.candidates:
        print(f"| {c['refresh_every']} | {c['planned_hit_rate']:.3f} | {c['uniform_hit_rate']:.3f} | "
              f"{c['swaps_per_token']:.2f} |")
    print(f"wrote {args.out}: slots {plan.slots}, refresh every {plan.refresh_every}", file=sys.stderr)
    return 0


def _model(args: argparse.Namespace) -> Path:
    from moetandem.assets import demo_model_path
    return Path(args.model) if args.model else demo_model_path()
