"""bench/capacity.py's report: the markdown table, the capacity at the TPOT target, and the plot."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def capacity(rows: list[dict[str, Any]], tpot_ms: float) -> dict[str, dict[str, Any]]:
    """Per cloud configuration: the largest measured ends count whose TPOT p95 meets the target (None: none does),
    and whether that is only a lower bound (the largest count measured meets it)."""
    out: dict[str, dict[str, Any]] = {}
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == config]
        ok = [r["ends"] for r in mine if r["tpot_p95_ms"] <= tpot_ms]
        best = max(ok, default=None)
        out[config] = {"ends": best, "lower_bound": best is not None and best == max(r["ends"] for r in mine)}
    return out


def capacity_line(config: str, cap: dict[str, Any], tpot_ms: float) -> str:
    what = f"capacity at TPOT p95 <= {tpot_ms:g} ms ({config})"
    if cap["ends"] is None:
        return f"{what}: none of the measured counts meets it"
    bound = " (a lower bound: the largest count measured meets it)" if cap["lower_bound"] else ""
    return f"{what}: {cap['ends']} ends{bound}"


def table(rows: list[dict[str, Any]], caps: dict[str, dict[str, Any]], tpot_ms: float,
          batching: dict[str, str] | None = None) -> str:
    """The rows, the capacity per cloud, and each cloud's own batching count (over its whole run: the reference
    and the warm-up rounds too)."""
    lines = ["| cloud | ends | tok/s (all ends) | TPOT p50 ms | TPOT p95 ms | TPOT max ms | TTFT p50 ms | "
             "exchanges / end | tokens = reference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ex = r["exchanges"]
        lines.append(f"| {r['config']} | {r['ends']} | {r['tok_s']:.1f} | {r['tpot_p50_ms']:.1f} | "
                     f"{r['tpot_p95_ms']:.1f} | {r['tpot_max_ms']:.1f} | {r['ttft_p50_ms']:.1f} | "
                     f"{sum(ex) / len(ex):.1f} | {'yes' if r['tokens_equal'] else 'no'} |")
    said = [f"cloud ({c}) batching across ends, whole run: {b}" for c, b in (batching or {}).items() if b]
    return "\n".join(["", *lines, "", *(capacity_line(c, cap, tpot_ms) for c, cap in caps.items()), *said, ""])


def plot(rows: list[dict[str, Any]], tpot_ms: float, path: Path) -> None:
    """TPOT p95 vs ends (log2 x) per configuration with the target line; aggregate tok/s on the second axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax2 = ax.twinx()
    for i, config in enumerate(dict.fromkeys(r["config"] for r in rows)):
        mine = [r for r in rows if r["config"] == config]
        x = [r["ends"] for r in mine]
        ax.plot(x, [r["tpot_p95_ms"] for r in mine], marker="o", color=f"C{i}", label=f"TPOT p95 ({config})")
        ax2.plot(x, [r["tok_s"] for r in mine], marker="s", ls=":", color=f"C{i}", label=f"tok/s ({config})")
    ax.axhline(tpot_ms, color="k", ls="--", lw=1, label=f"target {tpot_ms:g} ms")
    ax.set_xscale("log", base=2)
    counts = sorted({r["ends"] for r in rows})
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("concurrent ends")
    ax.set_ylabel("TPOT p95 over ends (ms)")
    ax2.set_ylabel("tok/s, all ends")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
