"""Perplexity, mean KL to the uncompressed model and top-1 agreement with a calibrated codec inserted at a cut.

    python bench/codec_kl.py DIR_SIDE4:28 DIR_SIDE4:60 DIR_PLAIN:254 --cut 1 --tokens 16384

Each DIR is a copy of the demo checkpoint calibrated with `moetandem calibrate --codec` (same fingerprint)."""
from __future__ import annotations

import moetandem
import argparse

import torch

from moetandem.analysis.eval import encode_text, evaluate_ids
from moetandem.assets import demo_model_path
from moetandem.split.calibration import codec_inserted, load_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("codecs", nargs="+", help="CHECKPOINT_DIR:RANK")
    ap.add_argument("--cut", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--data", default="../shared/data/eval/wikitext2_valid.txt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    eng = moetandem.load(demo_model_path(), device="cpu", dtype="float32", progress=False)
    ref = moetandem.load(demo_model_path(), device="cpu", dtype="float32", progress=False)
    ev = encode_text(eng, open(args.data, encoding="utf-8").read(), args.tokens)
    print("| codec | bytes/token | Δppl | mean KL, nats | top-1 agreement |\n|---|---|---|---|---|")
    for spec in args.codecs:
        path, rank = spec.rsplit(":", 1)
        codec = load_codec(path, args.cut, int(rank))
        with codec_inserted(eng, args.cut, codec):
            r = evaluate_ids(eng, ev, reference=ref, progress=False)
        print(f"| {spec} | {codec.nbytes_per_token} | {100 * (r.perplexity / r.reference_perplexity - 1):+.2f}% | "
              f"{r.mean_kl:.4f} | {100 * r.top1_agreement:.1f}% |")


if __name__ == "__main__":
    main()
