"""Hardware-aware group gate vs masked gating vs original routing + committee, side by side in one run.

    python bench/gate.py --data ../shared/data/eval/wikitext2_valid.txt --out out/gate

For each expert budget: the committee with exact miss handling (original routing: quality of the full model,
locality = hit rate), masked gating (router restricted to the resident experts, SwapMoE) and the group gate,
local-only (cost ∞) and with cost knobs that admit heavy non-local picks. Quality: perplexity, top-1 agreement
and KL against the all-resident model, fed --step tokens at a time. Locality: share of expert assignments that
were resident when computed. Also the gate's size and time relative to its MoE layer.
Trains the gates first (`moetandem calibrate --group-gate`) when the checkpoint has none or with --retrain.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moetandem import Engine  # noqa: E402
from moetandem.analysis.eval import encode_text, evaluate_ids  # noqa: E402
from moetandem.assets import demo_model_path  # noqa: E402
from moetandem.gating.group_gate import gate_path, save_gates  # noqa: E402
from moetandem.gating.train import train_gates  # noqa: E402


def gate_cost(eng: Engine, reps: int = 200) -> dict:
    """Gate parameters and time against its MoE layer, batch 1 and 64 rows, when every row needs the gate (a
    token whose original experts are all local skips it)."""
    block = eng.model.moe_blocks()[0]
    gate = eng.gate.gates[block.layer]
    out = {"gate_params": sum(p.numel() for p in gate.parameters()),
           "layer_expert_params": eng.args.num_experts * 3 * eng.args.hidden_size * eng.args.moe_intermediate_size}
    for T in (1, 64):
        x = torch.randn(1, T, eng.args.hidden_size, dtype=eng.dtype, device=eng.device)
        logits = block.gate(x[0])
        allowed = eng.gate.selector.local_mask(block.layer)[None].expand(T, -1).to(eng.device)
        timings = {}
        gate_fn = lambda: gate.scores(x[0], logits, allowed)  # noqa: E731  (worst case: every row missed)
        for name, fn in (("gate", gate_fn), ("layer", lambda: block(x))):
            with torch.inference_mode():
                fn()
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                timings[name] = (time.perf_counter() - t) / reps
        out[f"gate_share_T{T}"] = timings["gate"] / timings["layer"]
        out[f"gate_us_T{T}"] = timings["gate"] * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo MoE)")
    ap.add_argument("--data", type=Path, required=True, help="evaluation text")
    ap.add_argument("--train-data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/train/"
                    "tinyshakespeare.txt", help="calibration text for the gates (never the eval text)")
    ap.add_argument("--retrain", action="store_true")
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
    if args.retrain or not gate_path(ref.store.ckpt).is_file():
        ids = encode_text(ref, args.train_data.read_text(encoding="utf-8"))
        texts = [ref.decode_text(ids[i:i + 256]) or "" for i in range(0, len(ids), 256)]
        t = time.perf_counter()
        gates, reports = train_gates(ref, texts)
        save_gates(ref.store.ckpt, gates, {"trained_on": args.train_data.name})
        print(f"trained gates in {time.perf_counter() - t:.1f} s: " + ", ".join(
            f"L{r.layer} {r.masked_error:.3f}->{r.gate_error:.3f}" for r in reports), flush=True)
    ids = encode_text(ref, args.data.read_text(encoding="utf-8"), args.max_tokens)
    base = evaluate_ids(ref, ids, context=args.context, step=args.step, progress=False)
    rows = [{"config": "all resident", "budget": 1.0, "perplexity": base.perplexity, "top1": 1.0, "kl": 0.0,
             "local": 1.0}]
    runs = [(b, "original + committee (exact)", "off", math.inf) for b in args.budgets]
    for b in args.budgets:
        runs += [(b, "masked gating", "masked", math.inf), (b, "group gate", "group", math.inf)]
        for c in args.costs:
            runs += [(b, f"masked, cost {c}", "masked", c), (b, f"group gate, cost {c}", "group", c)]
    extra: dict = {}
    for budget, label, mode, cost in runs:
        eng = moetandem.load(model, device="cpu", progress=False, expert_budget=budget, policy="auto",
                             async_swaps=False, gate=mode, gate_cost=cost)
        q = evaluate_ids(eng, ids, context=args.context, step=args.step, reference=ref, progress=False)
        local = q.expert_stats.get("hit_rate", 1.0)
        rows.append({"config": label, "budget": budget, "perplexity": q.perplexity, "top1": q.top1_agreement,
                     "kl": q.mean_kl, "local": local})
        print(json.dumps(rows[-1]), flush=True)
        if mode == "group" and not extra:
            extra = gate_cost(eng)
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
                  f"parameters); time {extra['gate_us_T1']:.0f} µs = {100 * extra['gate_share_T1']:.1f}% of the "
                  f"MoE layer at 1 row (every row missed), {extra['gate_us_T64']:.0f} µs = {100 * extra['gate_share_T64']:.1f}% at 64 "
                  "rows"]
    table = "\n".join(lines)
    print(table)
    (args.out / "gate.md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    families = {"original + committee": "C0", "masked": "C1", "group gate": "C2"}
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
