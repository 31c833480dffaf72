"""Plot bytes/token vs perplexity increase of calibrated activation codecs (from their codec files).

    python bench/codec_plot.py "PCA=/tmp/demo-plain" "PCA + token side info=/tmp/demo-side4" --out docs/img/codec.png

Each DIR is a checkpoint directory calibrated with `moetandem calibrate --codec --eval-data ...`."""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moetandem.split.calibration import codec_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("series", nargs="+", help="LABEL=CHECKPOINT_DIR")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--out", default="docs/img/codec.png")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for spec in args.series:
        label, path = spec.split("=", 1)
        rows = sorted((r + 2 + (2 if info.get("side") else 0), 100 * info["ppl_increase"])
                      for (c, r), info in codec_table(path).items() if "ppl_increase" in info)
        ax.plot([b for b, _ in rows], [d for _, d in rows], "o-", label=label)
        for b, d in rows:
            print(f"{label}\t{b} B/token\t{2 * args.hidden / b:.1f}x\t{d:+.2f}%")
    ax.axhline(1.0, color="grey", ls="--", lw=0.8, label="+1% perplexity")
    ax.axvline(2 * args.hidden / 16, color="grey", ls=":", lw=0.8, label="16x fewer bytes than fp16")
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=2)
    ax.set_xlabel("bytes per token on the link (fp16 = %d)" % (2 * args.hidden))
    ax.set_ylabel("perplexity increase, % (WikiText-2)")
    ax.set_title("Activation codec at cut 1, demo MoE (hidden 256)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
