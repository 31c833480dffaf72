"""Grouped bar charts for the kernel benches (one group per case, one bar per path): one place for the figure
layout that bench/router.py and bench/decode_linear.py share."""
from __future__ import annotations

from pathlib import Path


def grouped_bars(cases: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: Path,
                 hline: float | None = None, width_per_case: float = 1.0, fontsize: int = 7) -> None:
    """cases: x labels; series: bar label -> one value per case (drawn side by side); hline: a dashed reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(width_per_case * len(cases) + 2, 3.7))
    w = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + w * (i - (len(series) - 1) / 2) for j in range(len(cases))], values, w, label=label)
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(cases)), cases, fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
