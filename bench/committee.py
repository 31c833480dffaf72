"""Parameter Committee: quality and speed versus expert budget, per policy, side by side in one run.

    python bench/committee.py --data ../shared/data/eval/wikitext2_valid.txt --out out/committee

Quality: perplexity, top-1 agreement and KL against the all-resident model on the same windows, fed `--step`
tokens at a time (1 = exactly what decoding sees), swaps waited for so the figures are reproducible.
Speed: batch-1 decode tok/s of `--gen-tokens` tokens (asynchronous swaps, as served), resident expert bytes;
bytes per evaluated token copied into slots and read by misses (the `--miss-format` configs read int8 / int4).
On CUDA also HF transformers + accelerate offload capped at the same GPU memory.
"""
from __future__ import annotations

import moetandem
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moetandem import Engine  # noqa: E402
from moetandem.analysis.eval import encode_text, evaluate_ids  # noqa: E402
from moetandem.assets import demo_model_path  # noqa: E402

CONFIGS = {  # label -> Engine.from_pretrained kwargs
    "exact (auto)": {"policy": "auto"}, "balanced": {"fidelity": "balanced"}, "fast": {"fidelity": "fast"},
    "substitute": {"policy": "substitute"}, "skip τ=0.1": {"policy": "skip"},
    "lru": {"policy": "lru"}, "static": {"policy": "static"}, "host-only": {"policy": "host-only"},
    "balanced, int8 misses": {"fidelity": "balanced", "miss_format": "int8"},
    "balanced, int4 misses": {"fidelity": "balanced", "miss_format": "int4"},
    "balanced, int4 miss tier": {"fidelity": "balanced", "miss_format": "int4", "miss_tier": "device"},
    # the tier's refresh hysteresis (default --swap-margin 1 with the tier): swap on any lead / on 1.5x / on 3x
    **{f"balanced, int4 miss tier, swap margin {m:g}": {"fidelity": "balanced", "miss_format": "int4",
                                                         "miss_tier": "device", "swap_margin": m} for m in (0, 0.5, 2)},
    # the tier's misses cost little: τ 0.05 without substitution, and every miss read (τ 0)
    "skip τ=0.05, int4 miss tier": {"policy": "skip", "skip_threshold": 0.05, "miss_format": "int4",
                                    "miss_tier": "device"},
    "read every miss, int4 miss tier": {"policy": "skip", "skip_threshold": 0.0, "miss_format": "int4",
                                        "miss_tier": "device"},
    # misses over the bus with the refresh's hysteresis (the default margin there is 0)
    "balanced, swap margin 1": {"fidelity": "balanced", "swap_margin": 1.0},
    "exact (auto), swap margin 1": {"policy": "auto", "swap_margin": 1.0},
    "balanced, <= 1 miss read": {"fidelity": "balanced", "miss_reads": 1},
    "balanced, <= 2 miss reads": {"fidelity": "balanced", "miss_reads": 2},
}


def speed(eng: Engine, prompt: list[int], new: int) -> float:
    eng.generate([prompt], max_new_tokens=4, stop_on_eos=False)
    eng.generate([prompt], max_new_tokens=new, stop_on_eos=False)
    return eng.last_stats.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the demo MoE)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--step", type=int, default=1)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    ap.add_argument("--plans", type=Path, nargs="*", default=[],
                    help="plan files from `moetandem plan`: each config also runs with the plan at its budget")
    ap.add_argument("--out", type=Path, default=Path("out/committee"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model or demo_model_path()
    ref = moetandem.load(model, device=args.device, dtype=args.dtype, progress=False)
    ids = encode_text(ref, args.data.read_text(encoding="utf-8"), args.max_tokens)
    prompt = ids[:32]
    total = ref.provider.expert_bytes()
    base = evaluate_ids(ref, ids, context=args.context, step=args.step, progress=False)
    rows = [{"config": "all resident", "budget": 1.0, "perplexity": base.perplexity, "top1": 1.0, "kl": 0.0,
             "hit_rate": 1.0, "tok_s": speed(ref, prompt, args.gen_tokens), "expert_mib": total / 2**20,
             "moved_kib_tok": 0.0, "miss_kib_tok": 0.0, "miss_reads_tok": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    from moetandem.experts.plan import Plan
    runs = [(b, label, None) for b in args.budgets for label in args.configs]
    for plan in args.plans:
        b = round(Plan.load(plan).budget_bytes / total, 3)
        runs += [(b, label, plan) for label in args.configs]
    for budget, label, plan in runs:
        kw = dict(CONFIGS[label])
        if plan is not None:
            label, kw["plan"] = f"{label} + plan", str(plan)
        eng = moetandem.load(model, device=args.device, dtype=args.dtype, progress=False, expert_budget=budget,
                             async_swaps=False, **kw)
        t = time.perf_counter()
        q = evaluate_ids(eng, ids, context=args.context, step=args.step, reference=ref, progress=False)
        eng.provider.async_swaps = True
        st = q.expert_stats
        rows.append({"config": label, "budget": budget, "perplexity": q.perplexity, "top1": q.top1_agreement,
                     "kl": q.mean_kl, "hit_rate": st.get("hit_rate", 1.0),
                     "tok_s": speed(eng, prompt, args.gen_tokens),
                     "expert_mib": eng.provider.expert_bytes() / 2**20, "eval_s": time.perf_counter() - t,
                     # per evaluated token: slot copies (swaps, fetches) and host copies read by misses
                     "moved_kib_tok": st.get("bytes_moved", 0) / q.tokens / 2**10,
                     "miss_kib_tok": st.get("miss_bytes", 0) / q.tokens / 2**10,
                     # assignments read from a host copy, per evaluated token (all MoE layers together)
                     "miss_reads_tok": st.get("miss_reads", 0) / q.tokens})
        print(json.dumps(rows[-1]), flush=True)
        del eng
        gc.collect()
    (args.out / "committee.json").write_text(json.dumps(rows, indent=1))
    report(rows, args, model)


def report(rows: list[dict], args: argparse.Namespace, model: Path) -> None:
    base = rows[0]
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    lines = [f"model {model.name}, {dev}, eval {args.max_tokens} tokens of {args.data.name}, windows of "
             f"{args.context}, fed {args.step} token(s) at a time", "",
             "| budget | config | ppl | Δppl | top-1 agree | KL | hit rate | decode tok/s | × all-resident | expert MiB "
             "| moved KiB/tok | misses read KiB/tok | miss reads/tok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']:.2f} | {r['config']} | {r['perplexity']:.2f} | "
                     f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {100 * r['top1']:.2f}% | "
                     f"{r['kl']:.4f} | {100 * r['hit_rate']:.1f}% | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base['tok_s']:.2f} | {r['expert_mib']:.1f} | {r.get('moved_kib_tok', 0):.1f} | "
                     f"{r.get('miss_kib_tok', 0):.1f} | {r.get('miss_reads_tok', 0):.2f} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "committee.md").write_text(table + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label in dict.fromkeys(r["config"] for r in rows[1:]):
        rs = sorted((r for r in rows[1:] if r["config"] == label), key=lambda r: r["budget"])
        b = [r["budget"] for r in rs] + [1.0]
        axes[0].plot(b, [100 * r["top1"] for r in rs] + [100], marker="o", label=label)
        axes[1].plot(b, [r["perplexity"] for r in rs] + [base["perplexity"]], marker="o", label=label)
        axes[2].plot(b, [r["tok_s"] for r in rs] + [base["tok_s"]], marker="o", label=label)
    for ax, title in zip(axes, ["top-1 agreement with all resident (%)", "perplexity", "decode tok/s"]):
        ax.set_xlabel("expert budget (fraction of expert bytes)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Parameter Committee: memory – quality – speed")
    fig.tight_layout()
    fig.savefig(args.out / "committee.png", dpi=110)


if __name__ == "__main__":
    main()
