"""The fused MoE's GEMM kernels compiled for sm90 without a GPU (tests/test_fused_moe_compile.py's specialization),
and the SASS of their K loop counted: instructions per iteration, and warp instructions per weight element
(loop · warps / weights a K tile holds: it counts warps that repeat each other's work, as small tiles make them do).
A proxy for the issue cost of dequantizing at the weight loads, where a format is compute-bound; not a timing.

    python bench/fused_moe_sass.py --formats bf16 int4 mxfp4
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root), str(root / "tests")]
from test_fused_moe_compile import GROUPS, compile_sm90, fm  # noqa: E402
from moetandem.kernels import tuning  # noqa: E402


def sass(cubin: bytes) -> str:
    import triton
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout


def k_loop(text: str) -> list[str]:
    """Opcodes of the longest backward branch's body (the pipelined K loop)."""
    ins, labels, pending = [], {}, []
    for line in text.splitlines():
        if m := re.match(r"\s*(\.L\w+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            addr = int(m.group(1), 16)
            labels.update({p: addr for p in pending})
            pending = []
            ins.append((addr, re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())))
    loops = [(labels[m.group(1)], a) for a, body in ins if body.startswith("BRA")
             and (m := re.search(r"(\.L\w+)", body)) and labels.get(m.group(1), a + 1) <= a]
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    return [body.split()[0].split(".")[0] for a, body in ins if lo <= a <= hi]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["bf16", "int4", "mxfp4"], choices=list(fm.FMTS))
    ap.add_argument("--block-m", type=int, default=16)
    args = ap.parse_args()
    print(f"{'kernel':8} {'format':6} {'G':>5} {'tile NxK/warps':>15} {'loop':>5} {'per weight':>10}  top opcodes")
    for fmt in args.formats:
        for kernel, mats in ((fm._gate_up_kernel, 2), (fm._down_kernel, 1)):
            for c in tuning.CANDIDATES:
                ops = k_loop(sass(compile_sm90(kernel, fmt, c, args.block_m).asm["cubin"]))
                top = " ".join(f"{k}:{v}" for k, v in collections.Counter(ops).most_common(6))
                tile = f"{c.block_n}x{c.block_k}/{c.num_warps}"
                print(f"{kernel.fn.__name__[1:-7]:8} {fmt:6} {GROUPS[fmt]:>5} {tile:>15} {len(ops):>5} "
                      f"{len(ops) * c.num_warps / (mats * c.block_n * c.block_k):>10.3f}  {top}", flush=True)


if __name__ == "__main__":
    main()
