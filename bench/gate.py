"""Hardware-aware group gate vs masked gating vs original routing + committee, side by side in one run.

    python bench/gate.py --data ../shared/data/eval/wikitext2_valid.txt --out out/gate --threads 1

For each expert budget: the committee with exact miss handling (original routing: quality of the full model,
locality = hit rate), masked gating (router restricted to the resident experts, SwapMoE) and the group gate,
local-only (cost ∞) and with cost knobs that admit heavy non-local picks. Quality: perplexity, top-1 agreement
and KL against the all-resident model, fed --step tokens at a time. Locality: share of expert assignments that
were resident when computed. Also the gate's size and time relative to its MoE layer.
Trains the gates for each --objectives first (layer: the MoE layer's output error, train.py; kl: next-token KL
through the frozen model, distil.py), on --train-data, and saves each next to the checkpoint before its runs (the
last one trained stays there).
"""
from __future__ import annotations

import moetandem
import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moetandem import Engine  # noqa: E402
from moetandem.analysis.eval import encode_text, evaluate_ids  # noqa: E402
from moetandem.assets import demo_model_path  # noqa: E402
from moetandem.cli.calibrate import calibration_ids  # noqa: E402
from moetandem.gating.distil import distil_gates  # noqa: E402
from moetandem.gating.group_gate import FusedGate, GroupGate, masked_route, save_gates, topk_route  # noqa: E402
from moetandem.gating.train import train_gates  # noqa: E402


def _time(fn, reps: int) -> float:
    with torch.inference_mode():
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps


def gate_cost(eng: Engine, ref: Engine, reps: int = 1000) -> dict:
    """Gate parameters and time against its MoE layer (all experts resident, batch 1 and 64 rows) when every row
    needs the gate (a token whose original experts are all local skips it): the fused gate (its projection in the
    router's matmul: the extra columns, then one small matmul + the transfer + top-k), the same unfused, and masked
    gating's re-route for comparison."""
    layer = eng.model.moe_blocks()[0].layer
    return gate_cost_of(ref, eng.gate.gates[layer], eng.gate.fused[layer], reps)


def gate_cost_of(ref: Engine, gate: GroupGate, fused: FusedGate, reps: int = 1000) -> dict:
    block = ref.model.moe_blocks()[0]
    E = ref.args.num_experts
    eng = ref
    out = {"gate_params": sum(p.numel() for p in gate.parameters()),
           "layer_expert_params": eng.args.num_experts * 3 * eng.args.hidden_size * eng.args.moe_intermediate_size}
    for T in (1, 64):
        x = torch.randn(T, eng.args.hidden_size, dtype=eng.dtype, device=eng.device)
        k = block.top_k
        allowed = torch.zeros(T, E, dtype=torch.bool)
        allowed[:, : E // 2] = True
        t = {"moe": _time(lambda: block(x[None], ref.experts[block.layer]), reps // 4),
             "router": _time(lambda: block.gate(x), reps),
             "fused_router": _time(lambda: F.linear(x, fused.weight), reps)}
        full = F.linear(x, fused.weight)
        xd, logits = full[:, E:], full[:, :E]
        p = torch.softmax(logits.float(), -1)
        t["gate"] = _time(lambda: fused._topk(*fused.scores(xd, x, p, allowed), k), reps)
        t["unfused"] = _time(lambda: topk_route(gate.scores(x, logits, allowed)[0], k, allowed), reps)
        t["masked"] = _time(lambda: masked_route(logits, allowed, k, block.norm_topk_prob), reps)
        extra = t["gate"] + t["fused_router"] - t["router"]  # what the fused gate adds to the layer per call
        out[f"T{T}"] = {**{f"{n}_us": v * 1e6 for n, v in t.items()}, "gate_share": extra / t["moe"],
                        "over_masked_share": (extra - t["masked"]) / t["moe"],
                        "unfused_share": t["unfused"] / t["moe"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo MoE)")
    ap.add_argument("--data", type=Path, required=True, help="evaluation text")
    ap.add_argument("--train-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/train/"
                    "tinyshakespeare.txt", help="calibration text for the gates, a file or a folder of .txt (never the eval text)")
    ap.add_argument("--objectives", nargs="+", choices=["layer", "kl"], default=["layer", "kl"],
                    help="gates to train and compare (each is trained, saved next to the checkpoint, evaluated)")
    ap.add_argument("--train-tokens", type=int, default=65536, help="calibration tokens for the gates")
    ap.add_argument("--kl-steps", type=int, default=300, help="next-token KL distillation steps")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--costs", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/gate"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or demo_model_path()
    ref = moetandem.load(model, device="cpu", progress=False)
    train_ids = calibration_ids(ref, str(args.train_data), args.train_tokens)  # a file, or each .txt of a folder
    ids = encode_text(ref, args.data.read_text(encoding="utf-8"), args.max_tokens)
    base = evaluate_ids(ref, ids, context=args.context, step=args.step, progress=False)
    rows = [{"config": "all resident", "budget": 1.0, "perplexity": base.perplexity, "top1": 1.0, "kl": 0.0,
             "local": 1.0}]
    runs = [(b, "original + committee (exact)", "off", math.inf) for b in args.budgets]
    runs += [(b, f"masked{'' if c == math.inf else f', cost {c}'}", "masked", c)
             for b in args.budgets for c in [math.inf, *args.costs]]
    extra: dict = {}
    for objective in [None, *args.objectives]:  # None: the runs without a gate
        if objective is not None:
            t = time.perf_counter()
            if objective == "layer":
                texts = [ref.decode_text(train_ids[i:i + 256]) or "" for i in range(0, len(train_ids), 256)]
                gates, reports = train_gates(ref, texts)
                note = ", ".join(f"L{r.layer} {r.masked_error:.3f}->{r.gate_error:.3f}" for r in reports)
            else:
                gates, rep = distil_gates(ref, train_ids, steps=args.kl_steps)
                note = f"held-out KL {rep.masked_kl:.4f} -> {rep.gate_kl:.4f}, top-1 {rep.masked_top1:.4f} -> " \
                       f"{rep.gate_top1:.4f}"
            save_gates(ref.store.ckpt, gates, {"trained_on": args.train_data.name, "objective": objective})
            extra[f"train_s_{objective}"] = time.perf_counter() - t
            print(f"trained {objective} gates in {extra[f'train_s_{objective}']:.1f} s: {note}", flush=True)
            runs = [(b, f"group gate ({objective}){'' if c == math.inf else f', cost {c}'}", "group", c)
                    for b in args.budgets for c in [math.inf, *args.costs]]
        for budget, label, mode, cost in runs:
            eng = moetandem.load(model, device="cpu", progress=False, expert_budget=budget, policy="auto",
                                 async_swaps=False, gate=mode, gate_cost=cost)
            q = evaluate_ids(eng, ids, context=args.context, step=args.step, reference=ref, progress=False)
            local = q.expert_stats.get("hit_rate", 1.0)
            rows.append({"config": label, "budget": budget, "perplexity": q.perplexity, "top1": q.top1_agreement,
                         "kl": q.mean_kl, "local": local})
            print(json.dumps(rows[-1]), flush=True)
            if mode == "group" and "T1" not in extra:
                extra.update(gate_cost(eng, ref))
            del eng
            gc.collect()
    (args.out / "gate.json").write_text(json.dumps({"rows": rows, "gate": extra}, indent=1))
    report(rows, extra, args, model)


def report(rows: list[dict], extra: dict, args: argparse.Namespace, model: Path) -> None:
    base = rows[0]
    lines = [f"model {model.name}, cpu, eval {args.max_tokens} tokens of {args.data.name}, windows of "
             f"{args.context}, fed {args.step} token(s) at a time, committee with exact misses (auto)", "",
             "| budget | routing | local share | ppl | Δppl | top-1 agree | KL |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']:.2f} | {r['config']} | {100 * r['local']:.1f}% | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {100 * r['top1']:.2f}% | "
                     f"{r['kl']:.4f} |")
    if extra:
        share = 100 * extra["gate_params"] / extra["layer_expert_params"]
        lines += ["", f"gate: {extra['gate_params']} parameters per layer ({share:.2f}% of the layer's expert "
                  "parameters). Time per call when every row needs the gate, against the MoE layer (all resident):", "",
                  "| rows | MoE layer µs | router matmul µs | fused router matmul µs | fused gate µs | unfused gate µs "
                  "| masked re-route µs | fused gate, % of layer | over masked, % of layer | unfused, % of layer |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for T in (1, 64):
            c = extra[f"T{T}"]
            lines.append(f"| {T} | {c['moe_us']:.0f} | {c['router_us']:.1f} | {c['fused_router_us']:.1f} | "
                         f"{c['gate_us']:.1f} | {c['unfused_us']:.1f} | {c['masked_us']:.1f} | "
                         f"{100 * c['gate_share']:.1f}% | {100 * c['over_masked_share']:.1f}% | "
                         f"{100 * c['unfused_share']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    (args.out / "gate.md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families = {"original + committee": "C0", "masked": "C1", "group gate (layer)": "C2", "group gate (kl)": "C3"}
    for r in rows[1:]:
        fam = next(f for f in families if r["config"].startswith(f))
        for ax, key in zip(axes, ("top1", "perplexity")):
            v = 100 * r[key] if key == "top1" else r[key]
            ax.scatter(100 * r["local"], v, color=families[fam], marker="o" if "cost" not in r["config"] else "s")
            ax.annotate(f"{r['budget']:.2f}", (100 * r["local"], v), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    for ax, title in zip(axes, ["top-1 agreement with all resident (%)", "perplexity"]):
        ax.set_xlabel("expert computations served locally (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        for fam, color in families.items():
            ax.scatter([], [], color=color, label=fam)
    axes[1].axhline(base["perplexity"], color="gray", ls="--", lw=1)
    axes[0].legend(fontsize=8, title="(label: budget; square: cost knob)")
    fig.suptitle("Group gate vs masked gating: locality – quality")
    fig.tight_layout()
    fig.savefig(args.out / "gate.png", dpi=110)


if __name__ == "__main__":
    main()
