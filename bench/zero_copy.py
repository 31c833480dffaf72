"""Zero-copy miss reads per format: the fused MoE kernel reading every assignment's expert from pinned host memory
(slot ids n + e, as a committee's misses), bf16 slots beside int8 / int4 host copies (--miss-format), or the same
copies in GPU memory (--miss-tier device). Batch 1, random top-k over all E experts (rotating, so nothing repeats
in the L2), one MoE layer; GB/s counts the host copies' bytes each call reads. Calls are timed inside a CUDA
graph of GRAPH_CALLS calls (each with its own expert ids), so the host's launch time is not counted.

Why: on the Qwen3.5 shape int4 misses over the bus moved 6.7 GB/s where bf16 misses move 25-40 (tenth session),
i.e. the same time per expert for a quarter of the bytes. The host side runs on the config tuned for the call
(one for both sides); the block_k sweep shows whether a K tile that moves as many bytes per step as bf16's would
read the bus as fast.

    python bench/zero_copy.py --out out/zero-copy                        # Qwen3.5 and gpt-oss expert shapes
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fused_moe_formats import quantized_layer  # noqa: E402
from moetandem.kernels import fused_moe, fused_moe_supported  # noqa: E402
from moetandem.kernels import tuning  # noqa: E402

# the module (the package's `fused_moe` attribute is the function of the same name)
fm_mod = importlib.import_module("moetandem.kernels.fused_moe")

#: (E, H, I, top-k) of the experts of real shapes
SHAPES = {"qwen3.5-35b-a3b": (256, 2048, 512, 8), "gpt-oss-20b": (32, 2880, 2880, 4),
          "olmoe-1b-7b": (64, 2048, 1024, 8)}
FORMATS = ("bf16", "int8", "int4")
BLOCK_KS = (64, 128, 256, 512, 1024)
GRAPH_CALLS = 16


def graph_us(fn, reps: int) -> float:
    """Median µs per call of fn(i) (i < GRAPH_CALLS: the call's expert ids), from `reps` replays of one CUDA graph
    of GRAPH_CALLS calls, each replay timed with CUDA events."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(GRAPH_CALLS):  # warm-up outside the graph (tuning, compilation)
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(GRAPH_CALLS):
            fn(i)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / GRAPH_CALLS)
    times.sort()
    return times[len(times) // 2]


def case(shape: str, fmt: str, where: str, reps: int, sweep: bool) -> list[dict]:
    E, H, I, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    d13, d2, sc = quantized_layer(E, H, I, fmt, gen) if fmt != "bf16" else (
        (torch.randn(E, 2 * I, H, generator=gen, device="cuda") * H ** -0.5).bfloat16(),
        (torch.randn(E, H, I, generator=gen, device="cuda") * I ** -0.5).bfloat16(), None)
    if where == "host":
        d13, d2 = d13.cpu().pin_memory(), d2.cpu().pin_memory()
        sc = None if sc is None else tuple(s.cpu().pin_memory() for s in sc)
    slots13 = torch.zeros(1, 2 * I, H, dtype=torch.bfloat16, device="cuda")  # one bf16 slot, never hit
    slots2 = torch.zeros(1, H, I, dtype=torch.bfloat16, device="cuda")
    table = torch.arange(E, dtype=torch.int32, device="cuda") + 1  # every expert a miss: slot id 1 + e
    x = torch.randn(1, H, device="cuda").bfloat16()
    w = torch.full((1, k), 1.0 / k, device="cuda")
    perm = torch.randperm(E * 64, device="cuda") % E
    calls = [perm[i * k:(i + 1) * k].view(1, k).contiguous() for i in range(GRAPH_CALLS)]
    per_expert = sum(t[0].numel() * t.element_size() for t in (d13, d2)) + (
        0 if sc is None else sum(s[0].numel() * s.element_size() for s in sc))
    kw = dict(host=(d13, d2), host_fmt=fmt, host_scales=sc)

    def run(i: int) -> None:
        fused_moe(x, calls[i], w, slots13, slots2, table, **kw)

    run(0)  # tunes (once per shape bucket) and compiles
    torch.cuda.synchronize()
    rows = []

    def row(label: str, us: float) -> dict:
        r = dict(shape=shape, fmt=fmt, where=where, config=label, us=us, expert_mb=per_expert / 1e6,
                 gbs=k * per_expert / us / 1e3, us_per_expert=us / k)
        print(json.dumps(r), flush=True)
        return r
    rows.append(row("tuned", graph_us(run, reps)))
    if not sweep:
        return rows
    for bk in BLOCK_KS:
        for bn in (16, 32):
            c = tuning.KernelConfig(bn, bk, 4, 2)

            def run_c(i: int, c: tuning.KernelConfig = c) -> None:
                p = fm_mod._Plan(x, calls[i], w, slots13, slots2, table, "silu", 16, **kw)
                p.up(c)
                p.down(c)
                p.reduce()
            try:
                run_c(0)
                torch.cuda.synchronize()
            except Exception as err:  # a tile too large for this format's shared memory: reported, skipped
                print(f"{shape} {fmt} {where} block_k {bk} block_n {bn}: {type(err).__name__}: {err}", flush=True)
                continue
            rows.append(row(f"block_n {bn}, block_k {bk}", graph_us(run_c, reps)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["qwen3.5-35b-a3b", "gpt-oss-20b"], choices=list(SHAPES))
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--where", nargs="+", default=["host", "device"], choices=("host", "device"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-sweep", action="store_true", help="only the tuned config")
    ap.add_argument("--out", type=Path, default=Path("out/zero-copy"))
    a = ap.parse_args()
    if not fused_moe_supported("cuda", torch.bfloat16):
        raise SystemExit("bench/zero_copy.py measures the fused MoE kernel on a CUDA GPU; none is usable here")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in a.shapes:
        for fmt in a.formats:
            for where in a.where:
                rows += case(shape, fmt, where, a.reps, not a.no_sweep)
                (a.out / "zero_copy.json").write_text(json.dumps(rows, indent=1))
    print("| shape | format | copy in | config | µs per call | µs per expert | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['fmt']} | {r['where']} | {r['config']} | {r['us']:.1f} | {r['us_per_expert']:.1f} "
              f"| {r['gbs']:.1f} |")


if __name__ == "__main__":
    main()
