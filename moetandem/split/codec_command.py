"""`moetandem calibrate --codec`: fit activation codecs per (cut, rank), measure their perplexity cost, save them
next to the checkpoint and print the table (rank, bytes/token, × fewer than fp16, ppl, Δppl%)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from moetandem.errors import InvalidRequestError


def add_codec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation codec (end–cloud split)")
    g.add_argument("--codec", action="store_true", help="calibrate low-rank activation codecs instead of expert "
                   "similarity; --data is training text (a file or a directory of .txt files)")
    g.add_argument("--cuts", type=int, nargs="+", metavar="C", help="cut layers: activations entering layer C "
                   "(default 1)")
    g.add_argument("--ranks", type=int, nargs="+", default=[16, 32, 64, 128], metavar="R",
                   help="codec ranks (default 16 32 64 128)")
    g.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="KL-distillation steps per codec after PCA on the calibration text (default 0: on the demo "
                   "it lowered the training-text KL but raised WikiText perplexity)")
    g.add_argument("--max-tokens", type=int, default=65536, metavar="N",
                   help="calibration tokens for the PCA and the side table (default 65536)")
    g.add_argument("--no-side-info", action="store_true", help="plain low-rank codes, without the token id and "
                   "the per-token mean activation (side information) that the decoder adds back")
    g.add_argument("--eval-data", metavar="FILE", help="text to measure perplexity with each codec on "
                   "(e.g. ../shared/data/eval/wikitext2_valid.txt); default: no quality column")
    g.add_argument("--eval-tokens", type=int, default=16384, metavar="N", help="evaluation tokens (default 16384)")


def calibration_ids(engine: Any, data: str, max_tokens: int) -> list[int]:
    """Token ids of a text file, or of every .txt file in a directory (an equal share of tokens from each)."""
    from moetandem.analysis.eval import encode_text
    from moetandem.experts.commands import read_text
    p = Path(data)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise InvalidRequestError(f"no .txt files in {p}")
    share = max(2, max_tokens // len(files))
    ids: list[int] = []
    for f in files:
        ids += encode_text(engine, read_text(str(f))[: 8 * share], share)
    return ids


def codec_calibrate(args: argparse.Namespace, model: Path) -> int:
    from moetandem.engine import Engine
    from moetandem.analysis.eval import encode_text
    from moetandem.experts.commands import read_text
    from moetandem.split.calibration import fit_codecs, save_codecs
    if not args.data:
        raise InvalidRequestError("--codec needs --data: calibration (training) text, a file or a directory")
    engine = Engine.from_pretrained(model, device=args.device, dtype=args.dtype)
    L, H = engine.args.num_layers, engine.args.hidden_size
    cuts = args.cuts or [1]
    bad = [c for c in cuts if not 1 <= c <= L] + [r for r in args.ranks if not 1 <= r <= H]
    if bad:
        raise InvalidRequestError(f"cuts must be in 1..{L} and ranks in 1..{H} (got {bad[0]})")
    torch.manual_seed(0)
    ids = calibration_ids(engine, args.data, args.max_tokens)
    ev = encode_text(engine, read_text(args.eval_data), args.eval_tokens) if args.eval_data else None
    codecs = fit_codecs(engine, ids, cuts, args.ranks, args.max_tokens, args.finetune_steps, eval_ids=ev,
                        side_info=not args.no_side_info)
    base = next(iter(codecs.values())).info.get("base_ppl")
    path = save_codecs(engine.store.ckpt, codecs)
    print(f"| cut | rank | bytes/token | × fewer than fp16 | ppl | Δppl |\n|---|---|---|---|---|---|")
    print(f"| - | fp16 | {2 * H} | 1.0 | {_num(base)} | 0 |")
    for (c, _), codec in codecs.items():
        inc = codec.info.get("ppl_increase")
        print(f"| {c} | {codec.rank} | {codec.nbytes_per_token} | {2 * H / codec.nbytes_per_token:.1f} | "
              f"{_num(codec.info.get('ppl'))} | {'-' if inc is None else f'{100 * inc:+.2f}%'} |")
    print(f"wrote {path} ({len(codecs)} codecs)", file=sys.stderr)
    return 0


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
