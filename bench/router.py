"""The router at decode: cuBLAS F.linear + route_topk (two launches, today's path) against the fused
`moetandem::route_logits_topk` (one launch), for OLMoE (E=64) and Qwen3-30B-A3B (E=128) router shapes.

Every path runs as one CUDA graph over many calls with distinct router weights and inputs; the time is the replay
time / calls. Two settings: "hbm" cycles through enough distinct weights (--cold-mb, 2x the H200's 60 MB L2 by
default) that each call reads its weight from HBM, as in a decode step where the experts' bytes flush the L2 between
two routers; "l2" is 16 layers' weights (4-8 MB), which stay in the L2 across replays. Then a sweep of the fused
kernel's tilings (tokens and experts per program, warps) in the hbm setting, best first, to check the defaults.

    python bench/router.py --out out/router
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bars import grouped_bars  # noqa: E402
from bench.fused_moe import matrices, per_call_us  # noqa: E402
from moetandem.kernels.router import route_topk_op  # noqa: E402
from moetandem.kernels.router_logits import (Blocks, default_blocks, fused_supported, launch,  # noqa: E402
                                             route_logits_topk_op)

SHAPES = {"olmoe-1b-7b": dict(E=64, H=2048, k=8, renorm=False), "qwen3-30b-a3b": dict(E=128, H=2048, k=8, renorm=True)}
Route = Callable[[torch.Tensor, torch.Tensor], tuple]


def paths(k: int, renorm: bool) -> dict[str, Route]:
    def unfused(x: torch.Tensor, w: torch.Tensor) -> tuple:
        logits = F.linear(x, w)  # [T, E]
        return (logits, *route_topk_op(logits, k, "softmax_topk", renorm))
    return {"linear": lambda x, w: F.linear(x, w), "linear+route_topk": unfused,
            "fused": lambda x, w: route_logits_topk_op(x, w, None, k, "softmax_topk", renorm)}


def agreement(ws: list[torch.Tensor], xs: list[torch.Tensor], k: int, renorm: bool) -> float:
    """Fraction of rows whose fused ids equal F.linear + route_topk's (near-ties may flip with the summation order)."""
    same = total = 0
    for w, x in zip(ws[:64], xs[:64]):
        _, ids, _ = route_logits_topk_op(x, w, None, k, "softmax_topk", renorm)
        _, rid, _ = paths(k, renorm)["linear+route_topk"](x, w)
        same += int((ids == rid).all(dim=-1).sum())
        total += ids.shape[0]
    return same / total


def sweep(E: int, H: int, T: int, k: int, renorm: bool, ws: list[torch.Tensor], xs: list[torch.Tensor]) -> list[dict]:
    rows = []
    for bt in sorted({1, 2, 4, 8} & set(range(1, T + 1)) | {1}):
        if -(-T // bt) > 16:
            continue
        for be in (1, 2, 4, 8):
            for nw in (1, 2, 4):
                b = default_blocks(T, E, H, block_t=bt, block_e=be, num_warps=nw)
                us = per_call_us(lambda x, w, b=b: launch(x, w, None, k, "softmax_topk", renorm, b), ws, xs)
                rows.append(dict(blocks=b.__dict__, programs=-(-E // be) * -(-T // bt), us=us))
    return sorted(rows, key=lambda r: r["us"])


def plot(rows: list[dict], path: Path) -> None:
    names = ("linear+route_topk", "fused", "linear")
    grouped_bars([f"{r['shape']}\nT={r['T']} {r['setting']}" for r in rows], {n: [r[n] for r in rows] for n in names},
                 "µs per router call", f"router logits + top-k, {torch.cuda.get_device_name()}", path,
                 width_per_case=1.4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--cold-mb", type=float, default=120.0, help="distinct weights' bytes per graph in the hbm setting")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("out/router"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| shape | T | setting | calls | linear µs | linear+route_topk µs | fused µs | speedup | fused blocks | "
          "ids agree |\n|" + "---|" * 10, flush=True)
    rows, sweeps = [], []
    for name in args.shapes:
        E, H, k, renorm = (SHAPES[name][c] for c in ("E", "H", "k", "renorm"))
        for T in args.tokens:
            cold = max(16, round(args.cold_mb * 1e6 / (E * H * 2)))
            for setting, n in (("hbm", cold), ("l2", 16)):
                ws, xs = matrices(E, H, T, n)
                assert fused_supported(xs[0], ws[0], None), "the fused kernel does not take this shape"
                r = dict(shape=name, T=T, setting=setting, calls=n,
                         **{p: per_call_us(fn, ws, xs) for p, fn in paths(k, renorm).items()})
                r.update(speedup=r["linear+route_topk"] / r["fused"], agree=agreement(ws, xs, k, renorm),
                         blocks=default_blocks(T, E, H).__dict__)
                rows.append(r)
                print(f"| {name} | {T} | {setting} | {n} | {r['linear']:.2f} | {r['linear+route_topk']:.2f} | "
                      f"{r['fused']:.2f} | {r['speedup']:.2f}x | {Blocks(**r['blocks'])} | {r['agree']:.3f} |",
                      flush=True)
            if not args.no_sweep:
                ws, xs = matrices(E, H, T, cold)
                s = sweep(E, H, T, k, renorm, ws, xs)
                sweeps.append(dict(shape=name, T=T, rows=s))
                print(f"# sweep {name} T={T} (hbm), best first: " + "; ".join(
                    f"bt{r['blocks']['block_t']} be{r['blocks']['block_e']} w{r['blocks']['num_warps']} "
                    f"({r['programs']} progs) {r['us']:.2f}" for r in s[:8]) + f"; worst {s[-1]['us']:.2f}",
                    flush=True)
            del ws, xs
            torch.cuda.empty_cache()
    (args.out / "router.json").write_text(json.dumps({"rows": rows, "sweeps": sweeps}, indent=1))
    plot(rows, args.out / "router.png")


if __name__ == "__main__":
    main()
