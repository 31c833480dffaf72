"""The fused MoE kernel per expert format (bf16, int8, fp8, int4, mxfp4; kernels/quant.py) on one MoE layer of real
shapes: all experts resident, random weights quantized round-to-nearest on the GPU, random top-k routing.

Each format runs L layers' distinct weights in one CUDA graph (so a replay reads well over the 60 MB L2 even at
4 bits) and the time per call is the replay time / L. "MB read" counts the packed bytes a call must read: data and
scales of the gate, up and down matrices of each busy expert, once; GB/s and % of the H200's 4.8 TB/s HBM use it.
"err" is the relative error against the fp32 reference on the dequantized weights (the kernel's own error, not
the format's). The first call of each format and T bucket tunes the kernels (cached under MOETANDEM_CACHE_DIR).

    PYTHONPATH=. MOETANDEM_CACHE_DIR=out/fused-moe-formats/cache python bench/fused_moe_formats.py --out out/fused-moe-formats
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fused_moe import PEAK_GBS, SHAPES, copy_gbs, graph_us  # noqa: E402
from moetandem.kernels import fused_moe, fused_moe_reference, fused_moe_supported, quant  # noqa: E402

Experts = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]  # w13, w2, scales


def quantized_layer(E: int, H: int, I: int, fmt: str, gen: torch.Generator, chunk: int = 16) -> Experts:
    """Random experts (bf16, std 1/sqrt(K)) -> w13 [E, 2I, packed H], w2 [E, H, packed I] (+ scales), quantized
    `chunk` experts at a time on the GPU."""
    parts: list[list[torch.Tensor | None]] = [[], [], [], []]  # d13, s13, d2, s2
    for a in range(0, E, chunk):
        n = min(chunk, E - a)
        w13 = torch.randn(n, 2 * I, H, generator=gen, device="cuda") * H ** -0.5  # [n, 2I, H]
        w2 = torch.randn(n, H, I, generator=gen, device="cuda") * I ** -0.5  # [n, H, I]
        for i, t in enumerate((*quant.quantize(w13.bfloat16(), fmt), *quant.quantize(w2.bfloat16(), fmt))):
            parts[i].append(t)
    d13, s13, d2, s2 = (None if p[0] is None else torch.cat(p) for p in parts)  # type: ignore[arg-type]
    return d13, d2, None if s13 is None else (s13, s2)


def case(ex: list[Experts], E: int, k: int, H: int, I: int, T: int, fmt: str, seed: int = 0) -> dict:
    """One format and batch size over the layers' experts `ex` (one fused_moe call per layer)."""
    g = torch.Generator().manual_seed(seed)
    layers = len(ex)
    xs = [torch.randn(T, H, generator=g).to("cuda", torch.bfloat16) for _ in range(layers)]  # [T, H]
    idss = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda() for _ in range(layers)]
    ws = [torch.randn(T, k, generator=g).softmax(-1).cuda() for _ in range(layers)]  # [T, k]
    g13, g2 = (H, I) if ex[0][2] is None else (H // ex[0][2][0].shape[-1], I // ex[0][2][1].shape[-1])
    per_expert = quant.matrix_bytes(fmt, 2 * I, H, g13) + quant.matrix_bytes(fmt, H, I, g2)
    busy = sum(int(ids.unique().numel()) for ids in idss) / layers
    nbytes = busy * per_expert  # per call
    outs: list[torch.Tensor] = [torch.empty(0)] * layers

    def run() -> None:
        for li in range(layers):
            d13, d2, sc = ex[li]
            outs[li] = fused_moe(xs[li], idss[li], ws[li], d13, d2, fmt=fmt, scales=sc)

    t0 = time.perf_counter()
    run()  # eager first use: tunes and compiles
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    d13, d2, sc = ex[0]
    deq = [quant.dequantize(d, s, fmt) for d, s in zip((d13, d2), sc or (None, None))]
    ref = fused_moe_reference(xs[0].float(), idss[0], ws[0], *deq)
    err = float((outs[0].float() - ref).norm() / ref.norm())
    us = graph_us(run, layers)
    return dict(fmt=fmt, T=T, us=us, mb=nbytes / 1e6, gbs=nbytes / us / 1e3, pct=nbytes / us / 1e3 / PEAK_GBS * 100,
                expert_kb=per_expert / 1e3, groups=[g13, g2], rel_err=err, first_call_s=first_s)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.6 * len(shapes), 3.6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for fmt in dict.fromkeys(r["fmt"] for r in rows):
            rs = [r for r in rows if r["shape"] == shape and r["fmt"] == fmt]
            ax.plot([r["T"] for r in rs], [r["us"] for r in rs], "o-", label=fmt)
        ax.set_xscale("log", base=2)
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs per MoE layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fused MoE per expert format, {torch.cuda.get_device_name()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(quant.FORMATS), choices=list(quant.FORMATS))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--layers", type=int, default=16, help="distinct layers' weights per graph (defeats the L2)")
    ap.add_argument("--out", type=Path, default=Path("out/fused-moe-formats"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; device copy {copy_gbs():.0f} GB/s (r+w); "
          f"{args.layers} layers per graph")
    print("| shape | format | T | µs | MB read | GB/s | % of 4.8 TB/s | vs bf16 | KB per expert | err |\n|"
          + "---|" * 10, flush=True)
    rows: list[dict] = []
    for name in args.shapes:
        for fmt in args.formats:
            if not fused_moe_supported("cuda", quant.data_dtype(fmt), fmt):
                print(f"| {name} | {fmt} | - | not supported on this GPU |", flush=True)
                continue
            sh = SHAPES[name]
            gen = torch.Generator(device="cuda").manual_seed(0)
            ex = [quantized_layer(sh["E"], sh["H"], sh["I"], fmt, gen) for _ in range(args.layers)]
            for T in args.tokens:
                r = {"shape": name, **case(ex, **sh, T=T, fmt=fmt)}
                base = next((b["us"] for b in rows if (b["shape"], b["fmt"], b["T"]) == (name, "bf16", T)), None)
                r["vs_bf16"] = base / r["us"] if base else None
                rows.append(r)
                vs = f"{r['vs_bf16']:.2f}x" if r["vs_bf16"] else "-"
                print(f"| {name} | {fmt} | {T} | {r['us']:.1f} | {r['mb']:.1f} | {r['gbs']:.0f} | {r['pct']:.0f}% | "
                      f"{vs} | {r['expert_kb']:.0f} | {r['rel_err']:.2%} |  <!-- groups {r['groups']}, first call "
                      f"{r['first_call_s']:.1f}s -->", flush=True)
                (args.out / "fused_moe_formats.json").write_text(json.dumps(rows, indent=1))  # so far
            del ex
            torch.cuda.empty_cache()
    plot(rows, args.out / "fused_moe_formats.png")


if __name__ == "__main__":
    main()
