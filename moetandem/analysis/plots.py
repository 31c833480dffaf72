"""PNG plots of a routing trace (matplotlib, Agg backend): expert use over time, hit rate vs cache size,
expert popularity, co-activation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moetandem.analysis.trace import Trace

BUCKET = 32  # tokens per column of the use-over-time heatmaps


def _plt() -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def _finish(fig: Any, path: Path, many: bool = False) -> None:
    if many:  # tight_layout is slow with dozens of axes; a fixed spacing does
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.05, top=0.94, wspace=0.25, hspace=0.45)
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=90 if many else 110)
    _plt().close(fig)


def use_over_time(tr: "Trace", path: Path, bucket: int = BUCKET) -> None:
    """Per layer, uses of each expert (y) in each bucket of `bucket` tokens (x)."""
    plt = _plt()
    N, L, _ = tr.ids.shape
    cols_t = max(1, math.ceil(N / bucket))
    rows, cols = _grid(L)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for i, l in enumerate(tr.layers):
        ids, _ = tr.layer(i)
        m = np.zeros((tr.num_experts, cols_t))
        np.add.at(m, (ids, (np.arange(N) // bucket)[:, None]), 1.0)
        ax = axes[i // cols][i % cols]
        ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        ax.set_title(f"layer {l}", fontsize=8)
        if i:  # ticks on the first panel only: tick objects make dozens of axes slow
            ax.set_xticks([])
            ax.set_yticks([])
        ax.tick_params(labelsize=6)
    for j in range(L, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.supxlabel(f"token bucket ({bucket} tokens)")
    fig.supylabel("expert")
    fig.suptitle("expert use over time")
    _finish(fig, path, many=L > 4)


def hit_rate_curves(tr: "Trace", per: dict[int, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    x = np.arange(1, tr.num_experts + 1)
    for ax, key, name in ((axes[0], "hit_rate_optimal", "optimal (Belady)"), (axes[1], "hit_rate_lru", "LRU")):
        curves = np.array([per[l][key] for l in tr.layers])
        for c in curves:
            ax.plot(x, c, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(x, curves.mean(0), color="black", lw=2, label="mean over layers")
        ax.axvline(tr.ids.shape[2], color="gray", ls=":", lw=1, label="top-k")
        ax.set_title(f"{name}: a line per layer")
        ax.set_xlabel("cache size (experts per layer)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mean_lru = np.mean([per[l]["hit_rate_lru"] for l in tr.layers], axis=0)
    axes[0].plot(x, mean_lru, color="tab:red", ls="--", lw=1.5, label="LRU mean")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("hit rate")
    axes[0].set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def popularity_bars(tr: "Trace", per: dict[int, dict[str, Any]], path: Path) -> None:
    """Share of uses per expert, experts sorted by popularity: bars = mean over layers, a step line per layer."""
    plt = _plt()
    shares = []
    for l in tr.layers:
        c = np.sort(np.array(per[l]["popularity"]["counts"], dtype=float))[::-1]
        shares.append(c / max(1.0, c.sum()))
    shares_a = np.array(shares)  # [L, E]
    x = np.arange(tr.num_experts)
    fig, ax = plt.subplots(figsize=(max(6.0, min(14.0, 0.08 * tr.num_experts + 4)), 4))
    ax.bar(x, shares_a.mean(0), width=1.0, color="tab:blue", alpha=0.6, label="mean over layers")
    for row in shares_a:
        ax.stairs(row, np.arange(tr.num_experts + 1) - 0.5, color="black", alpha=0.2, lw=0.7)
    ax.axhline(1 / tr.num_experts, color="gray", ls=":", lw=1, label="uniform")
    ginis = [per[l]["popularity"]["gini"] for l in tr.layers]
    ax.set_title(f"expert popularity (lines: each of {len(tr.layers)} layers; gini "
                 f"{min(ginis):.2f}-{max(ginis):.2f})", fontsize=10)
    ax.set_xlabel("experts by popularity (rank)")
    ax.set_ylabel("share of uses")
    ax.legend(fontsize=8)
    _finish(fig, path)


def coactivation_maps(tr: "Trace", per: dict[int, dict[str, Any]], path: Path) -> None:
    """Co-activation of the first and last MoE layer as lift P(a,b)/(P(a)P(b)) (diagonal blanked)."""
    plt = _plt()
    show = sorted({tr.layers[0], tr.layers[-1]})
    fig, axes = plt.subplots(1, len(show), figsize=(5 * len(show), 4.2), squeeze=False)
    for ax, l in zip(axes[0], show):
        co = np.array(per[l]["coactivation"])
        p = np.diag(co)
        lift = np.divide(co, np.outer(p, p), out=np.zeros_like(co), where=np.outer(p, p) > 0)
        np.fill_diagonal(lift, np.nan)
        im = ax.imshow(lift, cmap="magma", interpolation="nearest")
        ax.set_title(f"layer {l}: co-activation lift", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_all(tr: "Trace", per: dict[int, dict[str, Any]], out: Path) -> list[Path]:
    paths = [out / "expert_use_over_time.png", out / "hit_rate_vs_cache_size.png", out / "popularity.png",
             out / "coactivation.png"]
    use_over_time(tr, paths[0])
    hit_rate_curves(tr, per, paths[1])
    popularity_bars(tr, per, paths[2])
    coactivation_maps(tr, per, paths[3])
    return paths
