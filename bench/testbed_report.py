"""Table and plot of bench/testbed.py results (one row per link × budget × ends × config, summed over ends)."""
from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

BASELINES = ("end-only", "cloud-only", "naive")
#: --cloud-head-topk: cloud-only with the LM head on the end (cloud-only then runs it in the cloud): the A of the A/B
END_HEAD = "cloud-only-end-head"
#: --cloud-decode-tokens: cloud-only with one exchange per token (cloud-only then decodes k tokens per exchange)
PER_TOKEN = "cloud-only-per-token"
#: --auto-plan: the end's own plan (`--split-plan auto`: raw timings of both sides and the live link, no baselines)
AUTO_PLAN = "auto"


def scenarios(res: dict[str, Any]) -> dict[tuple, dict[str, dict[str, float]]]:
    """(rate, rtt, budget, ends) -> config -> tok/s over all ends, median p50/p95 over ends, B/token/crossing."""
    acc: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in res["rows"]:
        acc[r["rate"], r["rtt"], r["budget"], r["ends"]][r["config"]].append(r)
    out: dict[tuple, dict[str, dict[str, float]]] = {}
    for key, by in acc.items():
        out[key] = {}
        for c, rows in by.items():
            conc = max(rows[0]["throughput"], key=int)
            crossings = 0 if c == "end-only" else 2
            out[key][c] = {"tok_s": sum(r["throughput"][conc] for r in rows),
                           "p50": statistics.median(r["lat_p50_ms"] for r in rows),
                           "p95": statistics.median(r["lat_p95_ms"] for r in rows),
                           "bpt": statistics.mean(r["bytes_per_token"] for r in rows) / max(crossings, 1),
                           "fallbacks": sum(r.get("fallbacks", 0) for r in rows), "plan": rows[0].get("plan", ""),
                           "model": sum(r.get("predicted_tok_s", float("nan")) for r in rows),
                           "replans": sum(r.get("replans", 0) or 0 for r in rows)}
    return out


def best_baseline(sc: dict[str, dict[str, float]]) -> str:
    return max((c for c in BASELINES if c in sc), key=lambda c: sc[c]["tok_s"])


def ratio(sc: dict[str, dict[str, float]]) -> tuple[float, str]:
    best = best_baseline(sc)
    return sc["adaptive"]["tok_s"] / sc[best]["tok_s"], best


def same_plan(plan: str) -> str:
    """The baseline an adaptive plan is (SplitPlan.describe() starts with its label), or "" for a plan of its own:
    where it is a baseline, adaptive ÷ that baseline is the spread of one configuration measured twice."""
    label = plan.split(" ", 1)[0] if plan else ""
    return label if label in BASELINES else ""


def head_ab(key: tuple, sc: dict[str, dict[str, float]]) -> str:
    """One scenario's A/B of --cloud-head-topk: cloud-only with the head on the end -> in the cloud (both one
    exchange per token: with --cloud-decode-tokens the cloud head's per-token run is PER_TOKEN)."""
    a, b = sc[END_HEAD], sc.get(PER_TOKEN, sc["cloud-only"])
    line = (f"- {key[0]:g} Mbit/s, {key[1]:g} ms, budget {key[2]:g}, {key[3]} end(s): cloud-only p50 "
            f"{a['p50']:.1f} → {b['p50']:.1f} ms/token, {a['tok_s']:.1f} → {b['tok_s']:.1f} tok/s, "
            f"{a['bpt']:.0f} → {b['bpt']:.0f} B/token/crossing")
    if "end-only" in sc:
        line += (f"; end-only p50 {sc['end-only']['p50']:.1f} ms/token (cloud head / end-only "
                 f"{b['p50'] / sc['end-only']['p50']:.2f}×)")
    return line


def decode_ab(key: tuple, sc: dict[str, dict[str, float]]) -> str:
    """One scenario's A/B of --cloud-decode-tokens: cloud-only with one exchange per token -> k tokens per exchange,
    and the k-token run against end-only and naive (issue 18's target: <= 0.47x both, per token)."""
    a, b = sc[PER_TOKEN], sc["cloud-only"]
    line = (f"- {key[0]:g} Mbit/s, {key[1]:g} ms, budget {key[2]:g}, {key[3]} end(s): cloud-only p50 "
            f"{a['p50']:.1f} → {b['p50']:.1f} ms/token, {a['tok_s']:.1f} → {b['tok_s']:.1f} tok/s")
    vs = [f"/ {c} {b['p50'] / sc[c]['p50']:.2f}×" for c in ("end-only", "naive") if c in sc and sc[c]["p50"] > 0]
    return line + (f"; k-token p50 {' '.join(vs)}" if vs else "")


def table(res: dict[str, Any]) -> str:
    """One row per scenario: tok/s of every config (all ends), adaptive ÷ each baseline; then p50 ms/token, link
    bytes per token per crossing, the model's tok/s (how well the cost model predicted each config), plans."""
    head = ["| link (Mbit/s, RTT ms) | budget | ends | end-only | cloud-only | naive | adaptive | ÷ end-only | "
            "÷ cloud-only | ÷ naive | **÷ best** |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = ["| link | budget | ends | config | tok/s | model tok/s | p50 / p95 ms/token | B/token/crossing |",
              "|---|---|---|---|---|---|---|---|"]
    plans = []
    sc_all = scenarios(res)
    ordered = sorted(sc_all.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2], kv[0][3]))  # by RTT, then rate
    for key, sc in ordered:
        rate, rtt, budget, ends = key
        if "adaptive" not in sc:
            continue
        r, best = ratio(sc)
        ad = sc["adaptive"]["tok_s"]
        cells = [f"{sc[c]['tok_s']:.1f}" if c in sc else "" for c in (*BASELINES, "adaptive")]
        rel = [f"{ad / sc[c]['tok_s']:.2f}×" if c in sc else "" for c in BASELINES]
        same = same_plan(sc["adaptive"]["plan"])
        note = "; the same plan, measured again" if same == best else f"; plan = {same}" if same else ""
        head.append(f"| {rate:g}, {rtt:g} | {budget:g} | {ends} | " + " | ".join(cells) + " | " + " | ".join(rel)
                    + f" | **{r:.2f}×** ({best}{note}) |")
        for c in (*BASELINES, END_HEAD, PER_TOKEN, "adaptive", AUTO_PLAN):
            if c in sc:
                m = sc[c]
                fb = f" ({m['fallbacks']:.0f} fallbacks)" if m["fallbacks"] else ""
                detail.append(f"| {rate:g}, {rtt:g} | {budget:g} | {ends} | {c}{fb} | {m['tok_s']:.1f} | "
                              f"{m['model']:.1f} | {m['p50']:.1f} / {m['p95']:.1f} | {m['bpt']:.0f} |")
        plans.append(f"- {rate:g} Mbit/s, {rtt:g} ms, budget {budget:g}, {ends} end(s): {sc['adaptive']['plan']}"
                     + (f" ({sc['adaptive']['replans']:.0f} re-plans while measured)" if sc['adaptive']['replans']
                        else ""))
    ab = [head_ab(k, sc) for k, sc in ordered if END_HEAD in sc and "cloud-only" in sc]
    kab = [decode_ab(k, sc) for k, sc in ordered if PER_TOKEN in sc and "cloud-only" in sc]
    auto = [auto_line(k, sc) for k, sc in ordered if AUTO_PLAN in sc]
    rs = [ratio(sc)[0] for sc in sc_all.values() if "adaptive" in sc]
    same = sum(same_plan(sc["adaptive"]["plan"]) == ratio(sc)[1] for sc in sc_all.values() if "adaptive" in sc)
    summary = (f"\nadaptive / best baseline (tok/s): min {min(rs):.2f}×, median {statistics.median(rs):.2f}×, "
               f"max {max(rs):.2f}× over {len(rs)} scenarios (in {same} of them the plan was the best baseline's "
               f"own, measured again); wall {res.get('wall_s', 0):.0f} s\n") if rs else ""
    return ("\n".join(head) + "\n" + summary + "\nPer config (model tok/s: the cost model's prediction at the "
            "plan's concurrency, summed over ends):\n\n" + "\n".join(detail) +
            "\n\nAdaptive plans (end 0 of each scenario):\n\n" + "\n".join(plans) + "\n"
            + (f"\nLM head on the end → in the cloud (--cloud-head-topk {res['args'].get('cloud_head_topk')}):\n\n"
               + "\n".join(ab) + "\n" if ab else "")
            + (f"\nOne exchange per token → {res['args'].get('cloud_decode_tokens')} "
               f"{'sampled' if res['args'].get('temperature', 0) > 0 else 'greedy'} tokens per exchange "
               "(--cloud-decode-tokens, head in the cloud):\n\n" + "\n".join(kab) + "\n" if kab else "")
            + ("\nThe end's own plan (`--split-plan auto`, no baseline runs) against the best baseline and the "
               "adaptive plan:\n\n" + "\n".join(auto) + "\n" if auto else ""))


def auto_line(key: tuple, sc: dict[str, dict[str, float]]) -> str:
    a, best = sc[AUTO_PLAN], best_baseline(sc)
    line = (f"- {key[0]:g} Mbit/s, {key[1]:g} ms, budget {key[2]:g}, {key[3]} end(s): {a['tok_s']:.1f} tok/s, "
            f"{a['tok_s'] / sc[best]['tok_s']:.2f}× the best ({best})")
    if "adaptive" in sc:
        line += f", {a['tok_s'] / sc['adaptive']['tok_s']:.2f}× adaptive"
    plan = (a["plan"] or "?").split(";")[0]  # the cut and the experts: the rest is in the per-config table
    return line + f"; ended on {plan} ({a['replans']:.0f} re-plans while measured)"


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sc = scenarios(res)
    rtts = sorted({k[1] for k in sc})
    fig, axes = plt.subplots(1, len(rtts), figsize=(4.2 * len(rtts), 3.6), squeeze=False, sharey=True)
    for ax, rtt in zip(axes[0], rtts):
        for budget, ends in sorted({(k[2], k[3]) for k in sc}):
            keys = sorted(k for k in sc if k[1] == rtt and k[2] == budget and k[3] == ends and "adaptive" in sc[k])
            ax.plot([k[0] for k in keys], [ratio(sc[k])[0] for k in keys], marker="o",
                    label=f"budget {budget:g}, {ends} end(s)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("link Mbit/s")
        ax.set_title(f"RTT {rtt:g} ms")
    axes[0][0].set_ylabel("adaptive / best baseline (tok/s)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
