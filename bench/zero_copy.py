"""Zero-copy miss reads per format: the fused MoE kernel reading every assignment's expert from pinned host memory
(slot ids n + e, as a committee's misses), bf16 slots beside int8 / int4 host copies (--miss-format), or the same
copies in GPU memory (--miss-tier device). Batch 1, random top-k over all E experts (rotating, so nothing repeats
in the L2), one MoE layer; GB/s counts the host copies' bytes each call reads.

Why: on the Qwen3.5 shape int4 misses over the bus moved 6.7 GB/s where bf16 misses move 25-40 (tenth session),
i.e. the same time per expert for a quarter of the bytes. The host side runs on the config tuned for the call
(one for both sides); the block_k sweep shows whether a K tile that moves as many bytes per step as bf16's would
read the bus as fast.

    python bench/zero_copy.py --out out/zero-copy                        # Qwen3.5 and gpt-oss expert shapes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fused_moe_formats import quantized_layer  # noqa: E402
from moetandem.kernels import fused_moe, fused_moe_supported  # noqa: E402
from moetandem.kernels import fused_moe as fm_mod  # noqa: E402
from moetandem.kernels import tuning  # noqa: E402

#: (E, H, I, top-k) of the experts of real shapes
SHAPES = {"qwen3.5-35b-a3b": (256, 2048, 512, 8), "gpt-oss-20b": (32, 2880, 2880, 4),
          "olmoe-1b-7b": (64, 2048, 1024, 8)}
FORMATS = ("bf16", "int8", "int4")
BLOCK_KS = (64, 128, 256, 512, 1024)


def events_us(fn, reps: int) -> float:
    """Median µs per call over `reps` calls, each timed with CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
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
    calls = [perm[i * k:(i + 1) * k].view(1, k) for i in range(min(64, E * 64 // k))]
    it = iter(range(10**9))
    per_expert = sum(t[0].numel() * t.element_size() for t in (d13, d2)) + (
        0 if sc is None else sum(s[0].numel() * s.element_size() for s in sc))
    kw = dict(host=(d13, d2), host_fmt=fmt, host_scales=sc)

    def ids() -> torch.Tensor:
        return calls[next(it) % len(calls)]

    def run() -> None:
        fused_moe(x, ids(), w, slots13, slots2, table, **kw)

    run()  # tunes (once per shape bucket) and compiles
    torch.cuda.synchronize()
    rows = []

    def row(label: str, us: float) -> dict:
        r = dict(shape=shape, fmt=fmt, where=where, config=label, us=us, expert_mb=per_expert / 1e6,
                 gbs=k * per_expert / us / 1e3, us_per_expert=us / k)
        print(json.dumps(r), flush=True)
        return r
    rows.append(row("tuned", events_us(run, reps)))
    if not sweep:
        return rows
    for bk in BLOCK_KS:
        for bn in (16, 32):
            c = tuning.KernelConfig(bn, bk, 4, 2)

            def run_c() -> None:
                p = fm_mod._Plan(x, ids(), w, slots13, slots2, table, "silu", 16, **kw)
                p.up(c)
                p.down(c)
                p.reduce()
            try:
                run_c()
                torch.cuda.synchronize()
            except Exception as err:  # a tile too large for this format's shared memory: reported, skipped
                print(f"{shape} {fmt} {where} block_k {bk} block_n {bn}: {type(err).__name__}", flush=True)
                continue
            rows.append(row(f"block_n {bn}, block_k {bk}", events_us(run_c, reps)))
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
