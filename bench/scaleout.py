"""Cloud scale-out on a GPU host: decode tokens/s of E concurrent ends against one cloud process on one GPU,
`--expert-parallel N` (experts over N GPUs) and `--replicas N` (N one-GPU replicas under Ray Serve).

    python bench/scaleout.py --model DIR --ends 1,4,16 --gpus 2 --new 128 [--gpu-memory GIB] [--out scaleout.png]

Each configuration starts `moetandem cloud` (a subprocess, its own token), runs E ends in this process (split,
head 1 / tail 1, codec off) from threads, checks their tokens equal the single-process reference, and prints
a table (config, ends, tok/s, speed-up over one GPU) and writes a plot. `--configs nobatch,one` compares one
GPU without and with the cloud's batching across ends (`--batch-max-rows 1` vs the default). Needs CUDA GPUs
for the targets of issue 21 (2 H200: ≥ 1.8× one GPU at 16 ends); runs on CPU too (--device cpu) as a smoke
test.

`--gpu-memory GIB` caps every cloud process's GPU (each rank's with --expert-parallel) as if it were that small, so a
model that does not fit one capped GPU shows the one-GPU cloud refusing to start (its one-line error, the row
skipped) and the expert-parallel one serving it; `--end-budget B` keeps only a committee of B experts on each end
(exact misses), so ends of a large model fit the host's RAM (default: every expert resident on each end)."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import moetandem


def start_cloud(model: str, token: Path, device: str, extra: list[str],
                stderr: Any = None) -> tuple[subprocess.Popen, int] | None:
    """The cloud and its port, or None when it exits before listening (its error went to stderr: this process's,
    or the file given)."""
    env = dict(os.environ)
    if "--replicas" not in extra and "--expert-parallel" not in extra:
        env.setdefault("CUDA_VISIBLE_DEVICES", "0")  # the one-GPU baseline
    proc = subprocess.Popen([sys.executable, "-m", "moetandem", "cloud", "--model", model, "--listen", "127.0.0.1:0",
                             "--token-file", str(token), "--device", device, *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        print(f"moetandem cloud {' '.join(extra)} exited with {proc.wait()} before listening", flush=True)
        return None
    return proc, json.loads(line)["listening"]


def run_together(n: int, work: Callable[[int], None]) -> float:
    """work(0), ..., work(n - 1) on n threads released together (gRPC releases the GIL): the wall time from the
    release to the last one's end."""
    go = threading.Barrier(n + 1)

    def one(i: int) -> None:
        go.wait()
        work(i)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def run_ends(model: str, port: int, token: str, n: int, new: int, device: str,
             budget: str | None = None) -> tuple[float, list[list[int]]]:
    committee = {"expert_budget": budget, "fidelity": "exact"} if budget else {}
    ends = [moetandem.load(model, device=device, progress=False, cloud=f"127.0.0.1:{port}", token=token,
                           split={"head": 1, "tail": 1}, **committee) for _ in range(n)]
    prompts = [[(7 * i + j) % 200 + 1 for j in range(16)] for i in range(n)]
    out: list[list[int]] = [[] for _ in range(n)]

    def one(i: int) -> None:
        out[i] = ends[i].generate([prompts[i]], max_new_tokens=new, stop_on_eos=False)[0].token_ids

    dt = run_together(n, one)
    for e in ends:
        e.split.link.close()
    return n * new / dt, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ends", default="1,4,16")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--end-device", default="cpu", help="where the ends run (default cpu: the cloud is measured)")
    ap.add_argument("--configs", default="one,ep,replicas", help="of one, nobatch, ep, replicas")
    ap.add_argument("--gpu-memory", metavar="GIB", help="cap each cloud process's GPU at GIB GiB (moetandem cloud "
                    "--gpu-memory; each rank's with --expert-parallel)")
    ap.add_argument("--end-budget", metavar="B", help="each end's --expert-budget (exact misses; default: every "
                    "expert resident on the end)")
    ap.add_argument("--out", default="scaleout.png")
    a = ap.parse_args()
    tok = secrets.token_hex(16)
    token = Path(tempfile.mkdtemp()) / "token"
    token.write_text(tok)
    flags = {"one": [], "ep": ["--expert-parallel", str(a.gpus)], "replicas": ["--replicas", str(a.gpus)],
             "nobatch": ["--batch-max-rows", "1"]}  # one GPU without batching across ends
    rows: list[tuple[str, int, float]] = []
    reference: dict[int, list[list[int]]] = {}  # per end count: the tokens of the first configuration that ran
    ref_name = ""
    for name in a.configs.split(","):
        cap = ["--gpu-memory", a.gpu_memory] if a.gpu_memory else []
        started = start_cloud(a.model, token, a.device, flags[name] + cap)
        if started is None:
            print(f"{name:9s} did not start (see its error above): no rows", flush=True)
            continue
        proc, port = started
        ref_name = ref_name or name
        try:
            for n in (int(x) for x in a.ends.split(",")):
                tps, out = run_ends(a.model, port, tok, n, a.new, a.end_device, a.end_budget)
                same = reference.setdefault(n, out) == out  # the first configuration that ran
                rows.append((name, n, tps))
                print(f"{name:9s} ends={n:3d} {tps:9.1f} tok/s  tokens {'=' if same else '!='} {ref_name}",
                      flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    base = {n: t for c, n, t in rows if c == "one"}
    if not rows:
        raise SystemExit("no configuration started")
    print("\n| config | ends | tok/s | × one GPU |\n|---|---|---|---|")
    for c, n, t in rows:
        print(f"| {c} | {n} | {t:.1f} | {t / base[n]:.2f} |" if n in base else f"| {c} | {n} | {t:.1f} | – |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in dict.fromkeys(r[0] for r in rows):
        pts = [(n, t) for cc, n, t in rows if cc == c]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c)
    ax.set_xlabel("concurrent ends")
    ax.set_ylabel("decode tok/s (all ends)")
    ax.set_xscale("log", base=2)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
