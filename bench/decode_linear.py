"""The decode linear layers: cuBLAS (F.linear) against each Triton GEMV candidate (kernels/gemv.py) and the tuned
choice (`moetandem::decode_linear`, kernels/linear.py), at T = 1/4/8 tokens, on the attention projections (packed
qkv, o) and lm_heads of OLMoE-1B-7B and Qwen3-30B-A3B, bf16.

Each path runs one CUDA graph over L distinct weights (16 layers' projections; a few copies of an lm_head, each
already over the 60 MB L2) with their own inputs, so each call reads its weight from HBM as in a decode step; the
time is the replay time / L. GB/s counts the weight, the input and the output once. The tuned choice is searched at
the graph's warm-up (MOETANDEM_CACHE_DIR decides where it is kept: delete the decode_linear/ cache to re-tune).
Then the per-token sum for a whole model at T = 1: layers x (qkv + o) + lm_head, cuBLAS against tuned.

    python bench/decode_linear.py --out out/decode-linear
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
from bench.fused_moe import PEAK_GBS, matrices, per_call_us  # noqa: E402
from moetandem.kernels import gemv as G  # noqa: E402
from moetandem.kernels import linear as L  # noqa: E402

#: (N, K) per projection; layers: how many the model has (for the per-token sum)
SHAPES = {"olmoe-1b-7b": dict(layers=16, qkv=(6144, 2048), o=(2048, 2048), lm_head=(50304, 2048)),
          "qwen3-30b-a3b": dict(layers=48, qkv=(5120, 2048), o=(2048, 4096), lm_head=(151936, 2048))}
Linear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def paths(T: int) -> dict[str, Linear]:
    out: dict[str, Linear] = {"cublas": lambda x, w: F.linear(x, w), "tuned": lambda x, w: L.decode_linear_op(x, w)}
    for c in G.CANDIDATES:
        if G.fits(c, T):
            out[f"{c.kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}"] = (
                lambda x, w, c=c: G.gemv(x, w, None, c))
    return out


def plot(rows: list[dict], path: Path) -> None:
    series = {"cuBLAS": [r["gbs"]["cublas"] for r in rows], "best Triton": [r["gbs"][r["best_triton"]] for r in rows],
              "tuned": [r["gbs"]["tuned"] for r in rows]}
    grouped_bars([f"{r['shape']}\n{r['proj']} T={r['T']}" for r in rows], series, "GB/s per call",
                 f"decode linear, bf16, {torch.cuda.get_device_name()}", path, hline=PEAK_GBS, width_per_case=0.9,
                 fontsize=6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--proj", nargs="+", default=["qkv", "o", "lm_head"], choices=["qkv", "o", "lm_head"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--layers", type=int, default=16, help="distinct projection weights per graph")
    ap.add_argument("--lm-head-copies", type=int, default=3, help="distinct lm_head weights per graph")
    ap.add_argument("--out", type=Path, default=Path("out/decode-linear"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; peak {PEAK_GBS:.0f} GB/s")
    print("| shape | proj | N x K | T | cuBLAS µs | GB/s | best Triton | µs | GB/s | tuned choice | µs | GB/s | "
          "tuned vs cuBLAS |\n|" + "---|" * 13, flush=True)
    rows = []
    for name in args.shapes:
        for proj in args.proj:
            N, K = SHAPES[name][proj]
            for T in args.tokens:
                ws, xs = matrices(N, K, T, args.lm_head_copies if proj == "lm_head" else args.layers)
                us = {p: per_call_us(fn, ws, xs) for p, fn in paths(T).items()}
                nbytes = 2 * (N * K + T * K + T * N)
                gbs = {p: nbytes / (t * 1e3) for p, t in us.items()}
                triton_paths = [p for p in us if p not in ("cublas", "tuned")]
                best = min(triton_paths, key=us.__getitem__)
                c = L.choice(xs[0], ws[0], None)
                chosen = "cublas" if c == L.CUBLAS else (
                    f"{c.kind} n{c.block_n} k{c.block_k} s{c.split_k} w{c.num_warps} st{c.num_stages}")
                rows.append(dict(shape=name, proj=proj, N=N, K=K, T=T, us=us, gbs=gbs, best_triton=best,
                                 choice=c.to_json()))
                print(f"| {name} | {proj} | {N} x {K} | {T} | {us['cublas']:.2f} | {gbs['cublas']:.0f} | {best} | "
                      f"{us[best]:.2f} | {gbs[best]:.0f} | {chosen} | {us['tuned']:.2f} | {gbs['tuned']:.0f} | "
                      f"{us['cublas'] / us['tuned']:.2f}x |", flush=True)
                del ws, xs
                torch.cuda.empty_cache()
    for name in args.shapes:  # a decode step's projections at T = 1
        r = {x["proj"]: x["us"] for x in rows if x["shape"] == name and x["T"] == 1}
        if set(r) == {"qkv", "o", "lm_head"}:
            n = SHAPES[name]["layers"]
            tot = {p: n * (r["qkv"][p] + r["o"][p]) + r["lm_head"][p] for p in ("cublas", "tuned")}
            print(f"# {name} per token at T=1 ({n} layers x (qkv + o) + lm_head): cuBLAS {tot['cublas']:.1f} µs, "
                  f"tuned {tot['tuned']:.1f} µs, saving {tot['cublas'] - tot['tuned']:.1f} µs", flush=True)
    (args.out / "decode_linear.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "decode_linear.png")


if __name__ == "__main__":
    main()
