"""End–cloud test bed (issue 18): one `moetandem cloud` serving 1..N end processes over emulated links, with the
baselines and the adaptive plan in the same run. Each end is a separate process with a few torch threads and a
RAM expert budget; the link (rate, RTT, jitter, loss) is emulated in the transport by split.shaper, both
directions on the end (so the end can change it between scenarios without restarting anything). Configs:

  end-only   no cloud; the committee at the end's budget
  cloud-only token ids up, everything in the cloud (--split-head 0 --split-tail 0), last hidden states down
  naive      fixed cut (1 head + 1 tail layer on the end), fp16 activations, no codec, 1 micro-batch
  adaptive   split.plan.make_split_plan on a live SplitProfile: end compute (this run's end-only step time),
             end memory (the budget), link rate/RTT (the LinkMonitor after a warm-up), cloud time incl. its
             queue (this run's cloud-only step time minus the measured RTT); re-plans when the link changes

    python bench/testbed.py --quick --out out/testbed                                  # CPU, demo, minutes
    python bench/testbed.py --model DIR --cloud-device cuda --out out/testbed-gpu       # GPU host, full grid
Prints a table (tok/s over all ends, p50/p95 ms/token, link bytes per token per crossing, adaptive / best
baseline) and writes testbed.json, testbed.md and testbed.png (speedup vs link rate per RTT) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.split import PROMPTS, measure  # noqa: E402

CONFIGS = ("end-only", "cloud-only", "naive", "adaptive")
FULL = dict(rates=[10, 50, 100, 1000], rtts=[5, 20, 50, 100], budgets=[0.25, 0.5], ends=[1, 4, 16])
QUICK = dict(rates=[10, 1000], rtts=[5, 50], budgets=[0.25, 0.5], ends=[1, 2])


def options(config: str, a: argparse.Namespace) -> dict[str, Any] | None:
    link = {"emulate_rate_mbit": a.rates[0], "emulate_rtt_ms": a.rtts[0], "emulate_jitter_ms": a.jitter_ms,
            "emulate_loss": a.loss, "emulate_down": True, "timeout_s": 60.0}
    if config == "cloud-only":
        return {**link, "head": 0, "tail": 0, "codec": "off", "micro_batches": 1}
    if config in ("naive", "adaptive"):
        return {**link, "head": 1, "tail": 1, "codec": "fp16", "micro_batches": 1}
    return None


def live_profile(eng: Any, end_tok_s: float, cloud_tok_s: float, budget: float, concurrency: int) -> Any:
    """A SplitProfile from this run's measurements: compute split half attention, half experts per layer."""
    from moetandem.split.plan import SplitProfile
    ar, mon = eng.args, eng.split.link.monitor
    L, E, k = ar.num_layers, ar.num_experts, ar.top_k
    eb = eng.store.expert_bytes(eng.dtype)
    bw = mon.bandwidth_bps if mon.bandwidth_bps != float("inf") else 1e9
    return SplitProfile(L, E, k, ar.hidden_size, [0.5 * end_tok_s / L] * L, [0.5 * cloud_tok_s / L] * L,
                        0.5 * end_tok_s / (L * k), 0.5 * cloud_tok_s / (L * k), eb, int(budget * L * E * eb),
                        [[k / E] * E for _ in range(L)], bw, mon.rtt_s, concurrency=concurrency)


def set_link(eng: Any, rate: float, rtt: float) -> None:
    link = eng.split.link
    for sh in (link.shaper, link.down_shaper):
        sh.set_rate(rate)
        sh.set_rtt(rtt)


def worker(a: argparse.Namespace) -> int:
    """One end: every (budget, config) engine once, then every link; in step with the other ends (barrier)."""
    import torch
    import moetandem
    from moetandem.split.connect import profile_replanner
    from moetandem.split.plan import make_split_plan
    torch.set_num_threads(a.threads)
    engines = {}
    for b in a.budgets:
        for c in CONFIGS:
            kw = {"cloud": a.cloud, "token_file": a.token_file, "split": options(c, a)} if options(c, a) else {}
            engines[b, c] = moetandem.load(a.model, device="cpu", dtype="float32", progress=False,
                                           expert_budget=b, **kw)
    out = []
    step = 0
    for rtt in a.rtts:
        for rate in a.rates:
            for b in a.budgets:
                base: dict[str, dict] = {}
                for c in CONFIGS:
                    eng = engines[b, c]
                    if c != "end-only":
                        set_link(eng, rate, rtt)
                    plan = ""
                    if c == "adaptive":  # warm up on the naive cut, then plan from what was measured
                        eng.generate(PROMPTS[:2], max_new_tokens=8, stop_on_eos=False)
                        rtt_s = eng.split.link.monitor.rtt_s
                        prof = live_profile(eng, base["end-only"]["lat_p50_ms"] / 1e3,
                                            max(1e-4, base["cloud-only"]["lat_p50_ms"] / 1e3 - rtt_s), b,
                                            max(a.concurrency))
                        p = make_split_plan(prof, "throughput")
                        eng.split.set_plan(p)
                        eng.split.replanner = profile_replanner(prof, "throughput")
                        plan = p.describe()
                    step += 1
                    barrier(a, step)
                    r = measure(c, eng, a)
                    r.update(config=c, rate=rate, rtt=rtt, budget=b, end=a.index, plan=plan)
                    base[c] = r
                    out.append(r)
    Path(a.result).write_text(json.dumps(out))
    return 0


def barrier(a: argparse.Namespace, step: int) -> None:
    d = Path(a.sync)
    (d / f"{step}-{a.index}").touch()
    while len(list(d.glob(f"{step}-*"))) < a.n_ends:
        time.sleep(0.01)


def orchestrate(a: argparse.Namespace) -> int:
    a.out.mkdir(parents=True, exist_ok=True)
    tok = a.out / "token"
    tok.write_text(secrets.token_hex(32) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.cloud_threads)}
    cloud = subprocess.Popen([sys.executable, "-m", "moetandem", "cloud", "--model", a.model, "--listen",
                              "127.0.0.1:0", "--token-file", str(tok), "--max-sessions", "256", "--log-level",
                              "warning", "--device", a.cloud_device, "--dtype", a.cloud_dtype],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(a) | {"out": str(a.out)},
                           "rows": []}
    t0 = time.time()
    try:
        addr = f"127.0.0.1:{json.loads(cloud.stdout.readline())['listening']}"
        for n in a.ends:
            sync = a.out / f"sync-{n}"
            sync.mkdir(exist_ok=True)
            for f in sync.iterdir():
                f.unlink()
            procs = []
            for i in range(n):
                cmd = [sys.executable, __file__, "--worker", "--index", str(i), "--n-ends", str(n), "--cloud", addr,
                       "--token-file", str(tok), "--sync", str(sync), "--result", str(a.out / f"end-{n}-{i}.json")]
                cmd += sys.argv[1:]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": str(a.threads)}))
            if any(p.wait() for p in procs):
                raise SystemExit(f"an end process failed ({n} ends)")
            for i in range(n):
                res["rows"] += [{**r, "ends": n} for r in json.loads((a.out / f"end-{n}-{i}.json").read_text())]
            print(f"[testbed] {n} end(s) done, {time.time() - t0:.0f} s", flush=True)
    finally:
        cloud.terminate()
        cloud.wait(10)
    res["wall_s"] = time.time() - t0
    from bench.testbed_report import plot, table
    md = table(res)
    (a.out / "testbed.json").write_text(json.dumps(res, indent=1, default=str))
    (a.out / "testbed.md").write_text(md)
    plot(res, a.out / "testbed.png")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    from moetandem.assets import demo_model_path
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_model_path()))
    p.add_argument("--out", type=Path, default=ROOT / "out" / "testbed")
    p.add_argument("--quick", action="store_true", help="reduced grid: 10/1000 Mbit × 5/50 ms, budgets 0.25/0.5, 1 and 2 ends")
    p.add_argument("--rates", type=float, nargs="+", help="Mbit/s (full: 10 50 100 1000)")
    p.add_argument("--rtts", type=float, nargs="+", help="ms (full: 5 20 50 100)")
    p.add_argument("--budgets", type=float, nargs="+", help="end expert budgets (0.25 0.5)")
    p.add_argument("--ends", type=int, nargs="+", help="end processes (1 4 16)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per end process (1)")
    p.add_argument("--cloud-threads", type=int, default=2)
    p.add_argument("--cloud-device", default="cpu")
    p.add_argument("--cloud-dtype", default="float32")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--latency-prompts", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4], help="requests per end (throughput)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--index", "--n-ends"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    for flag in ("--cloud", "--token-file", "--sync", "--result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    grid = QUICK if a.quick else FULL
    for k in ("rates", "rtts", "budgets", "ends"):
        if getattr(a, k) is None:
            setattr(a, k, grid[k])
    return worker(a) if a.worker else orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
