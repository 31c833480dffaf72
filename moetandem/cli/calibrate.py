"""`moetandem calibrate`: the committee's expert similarity (default), the activation codecs of the end-cloud
split (--codec) or the hardware-aware group gates (--group-gate); each product is saved next to the checkpoint."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from moetandem.cli.flags import add_device_args, model_path, read_text
from moetandem.config import ModelConfig
from moetandem.errors import InvalidRequestError


def register(sub: Any) -> None:
    p = sub.add_parser("calibrate", help="compute expert norms and similarity for substitution",
                       description="Writes moetandem-calibration.safetensors next to the checkpoint (or to "
                       "~/.cache/moetandem when it is read-only).")
    p.add_argument("model", nargs="?", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--data", help="calibration text: similarity of expert outputs on it (default: of weights)")
    p.add_argument("--rows", type=int, default=512, help="calibration rows per layer (default 512)")
    _add_codec_args(p)
    _add_group_gate_args(p)
    add_device_args(p)
    p.set_defaults(run=calibrate_command)


def _engine(args: argparse.Namespace) -> Any:
    from moetandem.runtime import build_engine
    return build_engine(ModelConfig(model_path(args), args.device, args.dtype, gpu_memory=args.gpu_memory))


def token_windows(engine: Any, text: str, window: int, max_tokens: int | None) -> list[list[int]]:
    ids = engine.encode(text)[: max_tokens or None]
    return [ids[i:i + window] for i in range(0, len(ids) - 1, window) if len(ids[i:i + window]) > 1]


def calibrate_command(args: argparse.Namespace) -> int:
    if args.codec:
        return codec_calibrate(args)
    if args.group_gate:
        return gate_calibrate(args)
    from moetandem.experts.similarity import output_calibration, save_calibration, weight_calibration
    engine = _engine(args)
    if args.data:
        texts = [engine.decode_text(w) or "" for w in token_windows(engine, read_text(args.data), 256, None)]
        sim, norms = output_calibration(engine, texts, rows=args.rows)
        source = "outputs"
    else:
        sim, norms = weight_calibration(engine.store)
        source = "weights"
    path = save_calibration(engine.store.ckpt, sim, norms, source)
    print(f"wrote {path} (similarity of expert {source}, {len(sim)} layers)")
    return 0


# ---- --group-gate
def _add_group_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("group gate (`--group-gate`)")
    g.add_argument("--group-gate", action="store_true", help="train the group gates by distillation on --data "
                   "(model frozen) and write moetandem-group-gate.safetensors next to the checkpoint")
    g.add_argument("--gate-rank", type=int, default=16, help="hidden-state rank of each gate (default 16)")
    g.add_argument("--gate-objective", choices=["kl", "layer"], default="kl",
                   help="kl (default): distil on the next-token KL through the frozen model, all layers together; "
                   "layer: fit each MoE layer's output (the earlier objective)")
    g.add_argument("--gate-steps", type=int, default=None,
                   help="training steps (default: 300 for kl, of 8 windows of 64 tokens; 800 per layer for layer)")
    g.add_argument("--gate-rows", type=int, default=4096, help="calibration rows per layer, layer objective "
                   "(default 4096)")
    g.add_argument("--gate-tokens", type=int, default=65536, help="calibration tokens, kl objective (default 65536)")


def gate_calibrate(args: argparse.Namespace) -> int:
    from moetandem.gating.group_gate import save_gates
    if not args.data:
        raise InvalidRequestError("--group-gate trains on calibration text: add --data FILE (not your eval text)")
    steps = args.gate_steps or (300 if args.gate_objective == "kl" else 800)
    if args.gate_rank < 1 or steps < 1 or args.gate_rows < 64 or args.gate_tokens < 1024:
        raise InvalidRequestError("need --gate-rank >= 1, --gate-steps >= 1, --gate-rows >= 64 and "
                                  "--gate-tokens >= 1024")
    engine = _engine(args)
    meta = {"trained_on": Path(args.data).name, "objective": args.gate_objective}
    if args.gate_objective == "kl":
        from moetandem.analysis.eval import encode_text
        from moetandem.gating.distil import distil_gates
        ids = encode_text(engine, read_text(args.data), args.gate_tokens)
        gates, rep = distil_gates(engine, ids, rank=args.gate_rank, steps=steps)
        path = save_gates(engine.store.ckpt, gates, meta)
        print("| routing | held-out KL | top-1 agree |\n|---|---|---|")
        print(f"| masked gating | {rep.masked_kl:.4f} | {100 * rep.masked_top1:.2f}% |")
        print(f"| group gate | {rep.gate_kl:.4f} | {100 * rep.gate_top1:.2f}% |")
        print(f"wrote {path} ({steps} steps in {rep.train_s:.1f} s; next-token KL against all experts on held-out "
              "windows of the calibration text, committee-replayed local sets)", file=sys.stderr)
        return 0
    from moetandem.gating.train import train_gates
    texts = [engine.decode_text(w) or "" for w in token_windows(engine, read_text(args.data), 256, None)]
    gates, reports = train_gates(engine, texts, rows=args.gate_rows, rank=args.gate_rank, steps=steps)
    path = save_gates(engine.store.ckpt, gates, meta)
    print("| layer | gate params | masked gating error | group gate error | train s |\n|---|---|---|---|---|")
    for r in reports:
        print(f"| {r.layer} | {r.params} | {r.masked_error:.4f} | {r.gate_error:.4f} | {r.train_s:.1f} |")
    print(f"wrote {path} (held-out relative error of the MoE layer output under random local sets)", file=sys.stderr)
    return 0


# ---- --codec
def _add_codec_args(p: argparse.ArgumentParser) -> None:
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
    p = Path(data)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise InvalidRequestError(f"no .txt files in {p}")
    share = max(2, max_tokens // len(files))
    ids: list[int] = []
    for f in files:
        ids += encode_text(engine, read_text(str(f))[: 8 * share], share)
    return ids


def codec_calibrate(args: argparse.Namespace) -> int:
    import torch

    from moetandem.analysis.eval import encode_text
    from moetandem.split.calibration import fit_codecs, save_codecs
    if not args.data:
        raise InvalidRequestError("--codec needs --data: calibration (training) text, a file or a directory")
    engine = _engine(args)
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
    print("| cut | rank | bytes/token | × fewer than fp16 | ppl | Δppl |\n|---|---|---|---|---|---|")
    print(f"| - | fp16 | {2 * H} | 1.0 | {_num(base)} | 0 |")
    for (c, _), codec in codecs.items():
        inc = codec.info.get("ppl_increase")
        print(f"| {c} | {codec.rank} | {codec.nbytes_per_token} | {2 * H / codec.nbytes_per_token:.1f} | "
              f"{_num(codec.info.get('ppl'))} | {'-' if inc is None else f'{100 * inc:+.2f}%'} |")
    print(f"wrote {path} ({len(codecs)} codecs)", file=sys.stderr)
    return 0


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"
