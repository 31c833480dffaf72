"""Fused MoE (Triton, slot table) vs the grouped-GEMM path (`run_experts(..., grouped=True)`) on one MoE layer of
real shapes, random bf16 weights, random routing: all experts resident, and 50% of the experts in slots (flat slot
buffers as the committee holds them; misses carry weight 0, as the committee passes them to the grouped path).

Each path runs L layers' distinct weights in one CUDA graph (so the expert bytes of a replay are well over the
60 MB L2) and the time per layer is the replay time / L. GB/s counts the expert bytes a layer must read: the
busy resident experts' gate, up and down matrices, each once.

    python bench/fused_moe.py --out out/fused-moe

--gemv: at T <= 2 (the direct path) the fused path also runs with the GEMV kernels (kernels/fused_moe_gemv.py, what
MOETANDEM_MOE_GEMV=1 turns on), each tuned on its own, and the table gets their columns beside the tl.dot ones
(which then run with the switch off whatever the environment says); the T=1 breakdown is printed for both:

    python bench/fused_moe.py --shapes olmoe-1b-7b qwen3-30b-a3b --tokens 1 2 --fracs 1.0 0.5 --gemv
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moetandem.experts.resident import run_experts  # noqa: E402
from moetandem.experts.store import flat_views  # noqa: E402
from moetandem.kernels import fused_moe, fused_moe_reference  # noqa: E402
from moetandem.graphs import capture_graph  # noqa: E402

SHAPES = {"olmoe-1b-7b": dict(E=64, k=8, H=2048, I=1024), "qwen3-30b-a3b": dict(E=128, k=8, H=2048, I=768)}
PEAK_GBS = 4800.0
fm = importlib.import_module("moetandem.kernels.fused_moe")  # the module (the package exports the function)


@contextlib.contextmanager
def gemv_direct(on: bool | None) -> Iterator[None]:
    """fused_moe.GEMV_DIRECT set to `on` within the block (None: as the environment set it)."""
    before = fm.GEMV_DIRECT
    fm.GEMV_DIRECT = before if on is None else on
    try:
        yield
    finally:
        fm.GEMV_DIRECT = before


def matrices(N: int, K: int, T: int, n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """n distinct weights [N, K] (scaled by K^-1/2) and inputs [T, K], bf16 on the GPU: one per layer of a graph,
    so the weights are read from HBM as a decode step reads them."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ws = [torch.randn(N, K, generator=g, device="cuda", dtype=torch.bfloat16) * K ** -0.5 for _ in range(n)]
    xs = [torch.randn(T, K, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    return ws, xs


def per_call_us(fn: Callable[[torch.Tensor, torch.Tensor], object], ws: list[torch.Tensor],
                xs: list[torch.Tensor]) -> float:
    """µs per call of fn(x, w) over all (x, w), in one CUDA graph."""
    def step() -> None:
        for w, x in zip(ws, xs):
            fn(x, w)
    return graph_us(step, len(ws))


def graph_us(fn: Callable[[], None], layers: int, reps: int = 20, trials: int = 5) -> float:
    """Median over trials of (replay time / reps / layers), in µs."""
    g, _ = capture_graph(fn, None, fn)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps / layers)
    return statistics.median(times)


def make_inputs(E: int, k: int, H: int, I: int, T: int, frac: float, layers: int, seed: int = 0) -> tuple:
    """Per layer: a flat slot buffer [N, 3IH] (bf16), slot table [E], x [T, H], ids [T, k], weights [T, k]."""
    g = torch.Generator().manual_seed(seed)
    N = round(E * frac)
    bufs, tables, xs, idss, ws = [], [], [], [], []
    for _ in range(layers):
        bufs.append(torch.randn(N, 3 * I * H, device="cuda", dtype=torch.bfloat16) * H ** -0.5)  # [N, 3IH]
        tab = torch.full((E,), -1, dtype=torch.int32)  # [E]
        tab[torch.randperm(E, generator=g)[:N] if N < E else torch.arange(E)] = torch.arange(N, dtype=torch.int32)
        tables.append(tab.cuda())
        xs.append(torch.randn(T, H, generator=g).to("cuda", torch.bfloat16))  # [T, H]
        idss.append(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).cuda())  # [T, k]
        ws.append(torch.randn(T, k, generator=g).softmax(-1).cuda())  # [T, k]
    return N, bufs, tables, xs, idss, ws


def breakdown(E: int, k: int, H: int, I: int, T: int, layers: int, gemv: bool | None = None) -> dict:
    """µs per layer of each launch of the fused path (all resident), from graphs that stop after each stage; gemv:
    fused_moe.GEMV_DIRECT for it (None: as the environment set it)."""
    _, bufs, _, xs, idss, ws = make_inputs(E, k, H, I, T, 1.0, layers)
    views = [flat_views(b, I, H) for b in bufs]
    with gemv_direct(gemv):
        on = fm.GEMV_DIRECT
        cfg = fm._config(xs[0], idss[0], views[0][0], None, "bf16", None,
                         lambda bm: fm._Plan(xs[0], idss[0], ws[0], *views[0], None, "silu", bm, gemv=on))

    def upto(n: int) -> Callable[[], None]:
        def fn() -> None:
            for li in range(layers):
                p = fm._Plan(xs[li], idss[li], ws[li], *views[li], None, "silu", cfg.block_m, gemv=on)
                if n > 0:
                    p.up(cfg.up)
                if n > 1:
                    p.down(cfg.down)
                if n > 2:
                    p.reduce()
        return fn

    t = [graph_us(upto(n), layers) for n in range(4)]
    return {"align": t[0], "gate_up": t[1] - t[0], "down": t[2] - t[1], "sum": t[3] - t[2], "total": t[3],
            "gemv": on, "config": cfg.to_json()}


def case(E: int, k: int, H: int, I: int, T: int, frac: float, layers: int, seed: int = 0,
         gemv: bool = False) -> dict:
    """One row: grouped vs fused µs per layer; gemv (at T <= DIRECT_MAX_TOKENS): the fused path twice, tl.dot
    (GEMV_DIRECT off) and GEMV (on), the latter's figures under gemv_*."""
    N, bufs, tables, xs, idss, ws = make_inputs(E, k, H, I, T, frac, layers, seed)
    views = [flat_views(b, I, H) for b in bufs]
    full = frac == 1.0
    busy = 0
    for tab, ids in zip(tables, idss):
        slot = tab.long()[ids]  # [T, k]
        busy += int(slot[slot >= 0].unique().numel())
    expert_bytes = busy / layers * 3 * I * H * 2  # per layer

    def grouped_inputs(li: int) -> tuple[torch.Tensor, torch.Tensor]:
        slot = tables[li].long()[idss[li]]  # [T, k]; misses -> a published slot with weight 0 (committee style)
        return slot.clamp_min(0), ws[li] * (slot >= 0)

    gin = [grouped_inputs(li) for li in range(layers)]
    outs_g: list[torch.Tensor] = [torch.empty(0)] * layers
    outs_f: list[torch.Tensor] = [torch.empty(0)] * layers

    def run_grouped() -> None:
        for li in range(layers):
            outs_g[li] = run_experts(xs[li], gin[li][0], gin[li][1], *views[li], grouped=True)

    def run_fused() -> None:
        for li in range(layers):
            outs_f[li] = fused_moe(xs[li], idss[li], ws[li], *views[li], None if full else tables[li])

    def timed_fused(on: bool | None) -> tuple[float, float, float]:
        """(µs per layer, first eager call's s, relative error of layer 0) with GEMV_DIRECT = on."""
        with gemv_direct(on):
            t0 = time.perf_counter()
            run_fused()  # eager first use: tunes (cached in ~/.cache/moetandem/fused_moe) and compiles
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            return graph_us(run_fused, layers), first, float((outs_f[0].float() - ref).norm() / ref.norm())

    ref = fused_moe_reference(xs[0].float(), idss[0], ws[0], views[0][0].float(), views[0][1].float(),
                              None if full else tables[0])
    both = gemv and T <= fm.DIRECT_MAX_TOKENS
    tf, tune_s, err_f = timed_fused(False if both else None)
    run_grouped()
    err = {"grouped": float((outs_g[0].float() - ref).norm() / ref.norm()), "fused": err_f}
    tg = graph_us(run_grouped, layers)
    row = dict(T=T, slots=f"{N}/{E}", grouped_us=tg, fused_us=tf, expert_mb=expert_bytes / 1e6,
               grouped_gbs=expert_bytes / tg / 1e3, fused_gbs=expert_bytes / tf / 1e3,
               fused_pct=expert_bytes / tf / 1e3 / PEAK_GBS * 100, speedup=tg / tf, rel_err=err, first_call_s=tune_s)
    if both:
        tv, first_v, err["gemv"] = timed_fused(True)
        row.update(gemv_us=tv, gemv_gbs=expert_bytes / tv / 1e3, gemv_pct=expert_bytes / tv / 1e3 / PEAK_GBS * 100,
                   gemv_speedup=tf / tv, gemv_first_call_s=first_v)
    return row


def copy_gbs() -> float:
    """A device-to-device copy (bytes read + written) for context: what this GPU's HBM gives a simple kernel."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e9


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["shape"], r["slots"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (shape, slots) in zip(axes[0], groups):
        rs = [r for r in rows if r["shape"] == shape and r["slots"] == slots]
        ts = [r["T"] for r in rs]
        ax.plot(ts, [r["grouped_us"] for r in rs], "o-", label="grouped_mm (run_experts)")
        ax.plot(ts, [r["fused_us"] for r in rs], "s-", label="fused_moe (Triton)")
        for r in rs:
            ax.annotate(f"{r['fused_pct']:.0f}%", (r["T"], r["fused_us"]), textcoords="offset points",
                        xytext=(0, -12), ha="center", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape}, slots {slots}", fontsize=9)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("µs per MoE layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"fused MoE vs grouped GEMM, {torch.cuda.get_device_name()} (labels: % of {PEAK_GBS / 1e3} TB/s)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table_header(gemv: bool) -> str:
    cols = ["shape", "slots", "T", "grouped µs", "fused µs", "expert MB", "grouped GB/s", "fused GB/s",
            f"fused % of {PEAK_GBS / 1e3} TB/s", "speedup"]
    if gemv:
        cols += ["gemv µs", "gemv GB/s", "gemv %", "gemv vs tl.dot"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def table_row(name: str, r: dict, gemv: bool) -> str:
    """A markdown row of case()'s result r (with --gemv: its GEMV columns, '-' above the direct path)."""
    s = (f"| {name} | {r['slots']} | {r['T']} | {r['grouped_us']:.1f} | {r['fused_us']:.1f} | {r['expert_mb']:.0f} | "
         f"{r['grouped_gbs']:.0f} | {r['fused_gbs']:.0f} | {r['fused_pct']:.0f}% | {r['speedup']:.2f}x |")
    if gemv:
        s += (f" {r['gemv_us']:.1f} | {r['gemv_gbs']:.0f} | {r['gemv_pct']:.0f}% | {r['gemv_speedup']:.2f}x |"
              if "gemv_us" in r else " - | - | - | - |")
    return s + f"  <!-- err {r['rel_err']}, first call {r['first_call_s']:.1f}s -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--fracs", nargs="+", type=float, default=[1.0, 0.5])
    ap.add_argument("--layers", type=int, default=4, help="distinct layers' weights per graph (defeats the L2)")
    ap.add_argument("--out", type=Path, default=Path("out/fused-moe"))
    ap.add_argument("--gemv", action="store_true",
                    help="at T <= 2 also time the direct path's GEMV kernels (MOETANDEM_MOE_GEMV=1) beside tl.dot's")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; device copy {copy_gbs():.0f} GB/s (r+w); "
          f"GEMV_DIRECT {'off for the fused columns, on for the gemv ones' if args.gemv else fm.GEMV_DIRECT}")
    print(table_header(args.gemv), flush=True)
    for name in args.shapes:
        for frac in args.fracs:
            for T in args.tokens:
                r = {"shape": name, **case(**SHAPES[name], T=T, frac=frac, layers=args.layers, gemv=args.gemv)}
                rows.append(r)
                print(table_row(name, r, args.gemv), flush=True)
                torch.cuda.empty_cache()
    for name in args.shapes:
        for on in ((False, True) if args.gemv else (None,)):
            b = breakdown(**SHAPES[name], T=1, layers=args.layers, gemv=on)
            print(f"# {name} T=1 breakdown ({'GEMV' if b['gemv'] else 'tl.dot'}), µs per layer: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in b.items() if k not in ("config", "gemv"))
                  + f"; {b['config']}")
            rows.append({"shape": name, "breakdown_T1": b})
    (args.out / "fused_moe.json").write_text(json.dumps(rows, indent=1))
    plot([r for r in rows if "T" in r], args.out / "fused_moe.png")


if __name__ == "__main__":
    main()
