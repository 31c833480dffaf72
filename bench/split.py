"""End–cloud split benchmark over an emulated link (bench/netem.py): the cloud (`moetandem cloud`) runs in one
network namespace, the end in another, joined by a veth shaped with tbf; the RTT is added in the application
layer (`--emulate-rtt-ms` on both sides; this kernel has no netem). Same model, same prompts, side by side:

  cloud-only  the end holds no layers (--split-head 0 --split-tail 0): token ids up, last hidden states down
  end-only    no cloud; the end's committee under --expert-budget
  naive       one fixed cut (1 head + 1 tail layer on the end), fp16 activations, 1 micro-batch
  moetandem   the same cut, low-rank int8 codec (--codec-rank, token side information), --micro-batches

Per scenario (bandwidth Mbit/s × RTT ms) and config: latency per generated token p50/p95 (batch 1), throughput
(generated tokens / wall time) with --concurrency requests, link bytes per decoded token (split_stats). Once:
perplexity on the first --ppl-tokens tokens of --ppl-data for single-process, end-only and the split configs
(unshaped link, RTT 0). Writes split.json, split.md and split.png to --out.

    python bench/split.py --out out/split                                   # full grid (slow)
    python bench/split.py --scenarios 10x10 100x100 1000x10 --out out/split

The low-rank codec needs codecs at both cuts (1 and L-1). When the model directory lacks one, the benchmark
links the checkpoint into --out/model and runs `moetandem calibrate --codec` there for the missing cut
(--calib-tokens tokens of ../shared/data/train); the shipped demo has cut 1 only.

Needs root for the namespaces; with --loopback (or when namespaces cannot be made) it runs over 127.0.0.1 with
NO bandwidth limit (only the RTT is emulated) and says so in the output.
"""
from __future__ import annotations

import moetandem
import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["The history of the city begins", "In the early morning the soldiers", "The album was released in",
           "Scientists have long debated whether", "She walked into the room and", "The river flows through",
           "During the second world war", "The game was developed by"]
#: the same prompts as token ids, for a checkpoint that ships no tokenizer (bench/shapes.py's random ones): 6-8
#: ids each, like the texts' lengths
ID_PROMPTS = [[100 + 37 * i + j for j in range(6 + i % 3)] for i in range(len(PROMPTS))]
CONFIGS = ("cloud-only", "end-only", "naive", "moetandem")


def prompts_for(engine: Any) -> list[str] | list[list[int]]:
    """PROMPTS where the engine has a tokenizer, else ID_PROMPTS."""
    return PROMPTS if getattr(engine, "tokenizer", None) is not None else ID_PROMPTS
GRID_BW, GRID_RTT = (10, 50, 100, 1000), (10, 40, 100)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def split_options(config: str, a: argparse.Namespace, rtt_ms: float) -> dict[str, Any] | None:
    L1 = {"emulate_rtt_ms": rtt_ms, "timeout_s": 60.0}
    if config == "cloud-only":
        return {**L1, "head": 0, "tail": 0, "codec": "off", "micro_batches": 1}
    if config == "naive":
        return {**L1, "head": 1, "tail": 1, "codec": "fp16", "micro_batches": 1}
    if config.startswith("moetandem"):  # "moetandem@R": another codec rank (quality pass)
        rank = int(config.split("@")[1]) if "@" in config else a.codec_rank
        return {**L1, "head": 1, "tail": 1, "codec": "lowrank", "codec_rank": rank,
                "micro_batches": a.micro_batches}
    if config in ("end-only", "single"):
        return None
    raise SystemExit(f"unknown config {config}")


# ---------------------------------------------------------------- the end side (a worker process in the end netns)

def load_engine(config: str, a: argparse.Namespace, rtt_ms: float) -> Any:
    split = split_options(config, a, rtt_ms)
    budget = None if config == "single" else a.expert_budget
    kw: dict[str, Any] = {"cloud": a.cloud, "token_file": a.token_file, "split": split} if split else {}
    return moetandem.load(a.model, device="cpu", dtype="float32", progress=False, expert_budget=budget, **kw)


def link_bytes(engine: Any) -> float:
    sp = getattr(engine, "split", None)
    if sp is None:
        return 0.0
    s = sp.split_stats()
    return float(s["bytes_sent"] + s["bytes_received"])


def step_of(engine: Any, n: int) -> int:
    """A number that grows with every decode step of the engine (n: tokens seen so far, for an engine without a
    split: one token per step). A split step is one cloud or local forward, or one k-token decode exchange."""
    sp = getattr(engine, "split", None)
    if sp is None:
        return n
    s = sp.stats
    return s["cloud_forwards"] + s["local_forwards"] + s.get("decode_exchanges", 0)


def per_token_s(marks: list[tuple[float, int]]) -> list[float]:
    """(time, step) of each token of one sequence, prefill first -> seconds per decode token: a step that made n
    tokens of the sequence (split option cloud_decode_tokens) counts its time n times, divided by n."""
    steps: list[list[float]] = []  # the tokens' times, per step
    for i, (t, step) in enumerate(marks):
        if i and marks[i - 1][1] == step:
            steps[-1].append(t)
        else:
            steps.append([t])
    return [(b[-1] - a[-1]) / len(b) for a, b in zip(steps, steps[1:]) for _ in b]


def sampling(a: argparse.Namespace) -> dict[str, Any]:
    """--temperature T > 0: every measured request samples (seeded, so a run is repeatable); 0: greedy."""
    t = getattr(a, "temperature", 0.0)
    return {"temperature": t, "top_p": 0.9, "seed": 0} if t > 0 else {}


def measure(config: str, engine: Any, a: argparse.Namespace) -> dict[str, Any]:
    prompts = prompts_for(engine)
    engine.generate(prompts[:1], max_new_tokens=4, stop_on_eos=False)  # warm-up (session, caches, link)
    before = dict(engine.split.split_stats()) if getattr(engine, "split", None) is not None else {}
    gaps: list[float] = []
    dec_bytes, dec_tokens = 0.0, 0
    for p in prompts[: a.latency_prompts]:
        marks: list[tuple[float, int]] = []
        mark: list[float] = []

        def on_token(i: int, tok: int) -> None:
            marks.append((time.perf_counter(), step_of(engine, len(marks))))
            if len(marks) == 1:
                mark.append(link_bytes(engine))  # bytes after prefill
        engine.generate([p], max_new_tokens=a.tokens, stop_on_eos=False, on_token=on_token, **sampling(a))
        gaps += per_token_s(marks)
        dec_bytes += link_bytes(engine) - mark[0]
        dec_tokens += len(marks) - 1
    res: dict[str, Any] = {"config": config, "lat_p50_ms": percentile(gaps, 50) * 1e3,
                           "lat_p95_ms": percentile(gaps, 95) * 1e3,
                           "bytes_per_token": dec_bytes / max(dec_tokens, 1), "throughput": {}}
    res["step_ms"] = {}  # median decode step per token at each concurrency (sequence 0's tokens)
    for c in a.concurrency:
        batch = [prompts[i % len(prompts)] for i in range(c)]
        seen: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        out = engine.generate(batch, max_new_tokens=a.tokens, stop_on_eos=False, **sampling(a),
                              on_token=lambda i, tok: seen.append((time.perf_counter(), step_of(engine, len(seen))))
                              if i == 0 else None)
        dt = time.perf_counter() - t0
        res["throughput"][str(c)] = sum(len(g.token_ids) for g in out) / dt
        res["step_ms"][str(c)] = percentile(per_token_s(seen), 50) * 1e3
    sp = getattr(engine, "split", None)
    if sp is not None:
        s = {k: v - before.get(k, 0) for k, v in sp.split_stats().items() if k in ("fallbacks", "local_forwards", "replans",
                                                                                  "cloud_forwards", "decode_exchanges")}
        res["fallbacks"], res["local_forwards"], res["cloud_forwards"] = s["fallbacks"], s["local_forwards"], s["cloud_forwards"]
        res["replans"], res["decode_exchanges"] = s["replans"], s["decode_exchanges"]
        if s["fallbacks"]:
            print(f"[split bench] WARNING: {config} fell back to the end {int(s['fallbacks'])} times", file=sys.stderr)
    return res


def quality(config: str, a: argparse.Namespace) -> dict[str, Any]:
    from moetandem.analysis.eval import evaluate
    engine = load_engine(config, a, 0.0)
    text = Path(a.ppl_data).read_text(encoding="utf-8")[: a.ppl_tokens * 8]
    r = evaluate(engine, text, context=256, max_tokens=a.ppl_tokens + 1, progress=False)
    out = {"config": config, "ppl": r.perplexity, "tokens": r.tokens}
    sp = getattr(engine, "split", None)
    if sp is not None:
        out["fallbacks"] = sp.split_stats()["fallbacks"]
    return out


def worker(a: argparse.Namespace) -> int:
    import torch
    torch.set_num_threads(max(1, a.threads))
    if a.quality:
        results: list[dict[str, Any]] = [quality(c, a) for c in a.configs]
    else:  # one engine per config, kept for every bandwidth of this RTT (loading is the slow part here)
        from bench.netem import NetEm
        net = NetEm.attach(a.netns_end, a.netns_cloud) if a.netns_end else None
        engines = {c: load_engine(c, a, a.rtt) for c in a.configs}
        results = []
        for bw in a.rates or [None]:
            if net is not None and bw is not None:
                net.set_rate(bw)
            for c in a.configs:
                results.append({**measure(c, engines[c], a), "bandwidth_mbit": bw, "rtt_ms": a.rtt})
            print(f"[split bench worker] {bw} Mbit/s × {a.rtt:g} ms done", file=sys.stderr, flush=True)
    Path(a.result).write_text(json.dumps(results))
    return 0


# ---------------------------------------------------------------- orchestration

def ensure_codecs(model: Path, rank: int, out: Path, calib_tokens: int) -> Path:
    """A model directory with low-rank codecs at cuts 1 and L-1 for `rank` (calibrating the missing cut in a
    linked copy under out/model when needed)."""
    from moetandem.checkpoint import Checkpoint
    from moetandem.models import get_family
    from moetandem.split.calibration import load_codec
    from moetandem.errors import MoetandemError
    L = int(json.loads((model / "config.json").read_text())["num_hidden_layers"])

    def missing(d: Path) -> list[int]:
        ck = Checkpoint(d, check_family=get_family)
        bad = []
        for cut in (1, L - 1):
            try:
                load_codec(ck, cut, rank)
            except MoetandemError:
                bad.append(cut)
        return bad
    need = missing(model)
    if not need:
        return model
    copy = out / "model"
    copy.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        dst = copy / f.name
        if f.name == "moetandem-codec.safetensors":
            if not dst.exists():
                dst.write_bytes(f.read_bytes())
        elif not dst.exists():
            dst.symlink_to(f.resolve())
    need = missing(copy)
    if need:
        print(f"[split bench] calibrating codec cuts {need} rank {rank} in {copy} ({calib_tokens} tokens)", flush=True)
        subprocess.run([sys.executable, "-m", "moetandem", "calibrate", str(copy), "--codec", "--data",
                        str(ROOT.parent / "shared/data/train"), "--cuts", *map(str, need), "--ranks", str(rank),
                        "--max-tokens", str(calib_tokens)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return copy


class Cloud:
    def __init__(self, argv_wrap: Any, host: str, model: Path, token_file: Path, rtt_ms: float) -> None:
        cmd = [sys.executable, "-m", "moetandem", "cloud", "--model", str(model), "--listen", f"{host}:0",
               "--token-file", str(token_file), "--emulate-rtt-ms", str(rtt_ms), "--max-sessions", "64",
               "--log-level", "warning", "--device", "cpu", "--dtype", "float32"]
        self.proc = subprocess.Popen(argv_wrap(cmd), stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("moetandem cloud did not start")
        self.address = f"{host}:{json.loads(line)['listening']}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_worker(argv_wrap: Any, a: argparse.Namespace, configs: list[str], model: Path, token_file: Path,
               cloud: str | None, rtt: float, quality_pass: bool, rates: list[float] = (),
               net: Any = None) -> list[dict[str, Any]]:
    res = a.out / f"worker-{os.getpid()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", str(model), "--token-file",
           str(token_file), "--rtt", str(rtt), "--result", str(res), "--configs", *configs,
           "--tokens", str(a.tokens), "--latency-prompts", str(a.latency_prompts), "--concurrency",
           *map(str, a.concurrency), "--expert-budget", str(a.expert_budget), "--codec-rank", str(a.codec_rank),
           "--micro-batches", str(a.micro_batches), "--threads", str(a.threads), "--ppl-data", a.ppl_data,
           "--ppl-tokens", str(a.ppl_tokens)]
    if cloud:
        cmd += ["--cloud", cloud]
    if quality_pass:
        cmd.append("--quality")
    if rates:
        cmd += ["--rates", *map(str, rates)]
    if net is not None:
        cmd += ["--netns-end", net.end_ns, "--netns-cloud", net.cloud_ns]
    subprocess.run(argv_wrap(cmd), check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(res.read_text())


def orchestrate(a: argparse.Namespace) -> int:
    from bench.netem import NetEm, available
    a.out.mkdir(parents=True, exist_ok=True)
    model = ensure_codecs(Path(a.model), a.codec_rank, a.out, a.calib_tokens)
    token_file = a.out / "token"
    token_file.write_text(secrets.token_hex(32) + "\n")
    token_file.chmod(0o600)
    scenarios = [tuple(float(v) for v in s.lower().split("x")) for s in a.scenarios] if a.scenarios else \
        [(bw, rtt) for bw in GRID_BW for rtt in GRID_RTT]
    ok, why = (False, "--loopback given") if a.loopback else available()
    net = NetEm() if ok else None
    if not ok:
        print(f"[split bench] WARNING: no network namespaces ({why}): loopback, bandwidth NOT limited", flush=True)
    link_configs = [c for c in a.configs if c != "end-only"]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(model),
                               "netns": ok, "why_no_netns": why, "args": {k: str(v) for k, v in vars(a).items()},
                               "scenarios": [], "quality": []}
    t_start = time.time()
    try:
        if net is not None:
            net.setup()
        end_wrap = net.end_argv if net else (lambda c: c)
        cloud_wrap = net.cloud_argv if net else (lambda c: c)
        host = net.cloud_ip if net else "127.0.0.1"
        end_only = run_worker(end_wrap, a, ["end-only"], model, token_file, None, 0.0, False) \
            if "end-only" in a.configs else []
        print(f"[split bench] end-only (no link; the same row in every scenario): {end_only}", flush=True)
        for rtt in sorted({r for _, r in scenarios}):
            rates = sorted({b for b, r in scenarios if r == rtt})
            cloud = Cloud(cloud_wrap, host, model, token_file, rtt)
            try:
                rows = run_worker(end_wrap, a, link_configs, model, token_file, cloud.address, rtt, False,
                                  rates if net is not None else [], net) if link_configs else []
            finally:
                cloud.stop()
            for bw in rates:
                mine = [r for r in rows if r["bandwidth_mbit"] in (bw, None)]
                if net is None:  # loopback: one measurement, bandwidth not enforced
                    mine = rows
                results["scenarios"].append({"bandwidth_mbit": bw, "rtt_ms": rtt, "rows": mine + end_only})
            print(f"[split bench] RTT {rtt:g} ms done ({time.time() - t_start:.0f} s): " + json.dumps(rows), flush=True)
            (a.out / "split.json").write_text(json.dumps(results, indent=1))
        if a.ppl_tokens > 0:
            if net is not None:
                net.set_rate(None)
            cloud = Cloud(cloud_wrap, host, model, token_file, 0.0)
            try:
                q_configs = ["single"] + [c for c in a.configs] + [f"moetandem@{r}" for r in a.quality_ranks]
                results["quality"] = run_worker(end_wrap, a, q_configs, model, token_file, cloud.address, 0.0, True)
            finally:
                cloud.stop()
    finally:
        if net is not None:
            net.close()
    results["wall_s"] = time.time() - t_start
    (a.out / "split.json").write_text(json.dumps(results, indent=1))
    md = table(results, a)
    (a.out / "split.md").write_text(md)
    plot(results, a.out / "split.png", a)
    print(md)
    return 0


def best_baseline(rows: list[dict[str, Any]], key: Any, higher: bool) -> tuple[str, float]:
    base = [(r["config"], key(r)) for r in rows if r["config"] in ("cloud-only", "end-only", "naive")]
    return (max if higher else min)(base, key=lambda t: t[1])


def table(res: dict[str, Any], a: argparse.Namespace) -> str:
    cs = [str(c) for c in a.concurrency]
    head = ("| link | config | latency p50 / p95 (ms/token) | " + " | ".join(f"tok/s @{c}" for c in cs)
            + " | link B/token |")
    lines = [head, "|" + "---|" * (5 + len(cs) - 1)]
    ratios = []
    for sc in res["scenarios"]:
        for r in sorted(sc["rows"], key=lambda r: CONFIGS.index(r["config"])):
            fb = f" ({int(r['fallbacks'])} fallbacks)" if r.get("fallbacks") else ""
            lines.append(f"| {sc['bandwidth_mbit']:g} Mbit/s, {sc['rtt_ms']:g} ms | {r['config']}{fb} | "
                         f"{r['lat_p50_ms']:.1f} / {r['lat_p95_ms']:.1f} | "
                         + " | ".join(f"{r['throughput'][c]:.1f}" for c in cs)
                         + f" | {r['bytes_per_token']:.0f} |")
        mt = [r for r in sc["rows"] if r["config"] == "moetandem"]
        if mt and len(sc["rows"]) > 1:
            cmax = cs[-1]
            bt = best_baseline(sc["rows"], lambda r: r["throughput"][cmax], True)
            bl = best_baseline(sc["rows"], lambda r: r["lat_p50_ms"], False)
            ratios.append(f"| {sc['bandwidth_mbit']:g} Mbit/s, {sc['rtt_ms']:g} ms | "
                          f"{mt[0]['throughput'][cmax] / bt[1]:.2f}× (vs {bt[0]}) | "
                          f"{(mt[0]['lat_p50_ms'] / bl[1] - 1) * 100:+.0f}% (vs {bl[0]}) |")
    out = "\n".join(lines) + "\n"
    if ratios:
        out += (f"\nmoetandem vs the best baseline (throughput @{cs[-1]}, latency p50; target ≥ 5.1× and −67%):\n\n"
                "| link | throughput ratio | latency change |\n|---|---|---|\n" + "\n".join(ratios) + "\n")
    if res["quality"]:
        q = {r["config"]: r for r in res["quality"]}
        out += (f"\nPerplexity, first {res['quality'][0]['tokens']} tokens of {Path(a.ppl_data).name} "
                f"(context 256; unshaped link, RTT 0):\n\n| config | ppl | vs single-process |\n|---|---|---|\n")
        base = q.get("single", {}).get("ppl")
        for c, r in q.items():
            rel = f"{(r['ppl'] / base - 1) * 100:+.2f}%" if base else "—"
            out += f"| {c} | {r['ppl']:.2f} | {rel} |\n"
    out += (f"\n{'netns + veth + tbf' if res['netns'] else 'LOOPBACK, bandwidth NOT limited (' + res['why_no_netns'] + ')'}"
            f", RTT in the application layer; {a.tokens} new tokens per request, latency over "
            f"{a.latency_prompts} prompts at batch 1; end expert budget {a.expert_budget}; codec rank {a.codec_rank}, "
            f"{a.micro_batches} micro-batches; wall {res.get('wall_s', 0):.0f} s.\n")
    return out


def plot(res: dict[str, Any], path: Path, a: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scs = res["scenarios"]
    if not scs:
        return
    bws = sorted({s["bandwidth_mbit"] for s in scs})
    rtts = sorted({s["rtt_ms"] for s in scs})
    cmax = str(a.concurrency[-1])
    fig, axes = plt.subplots(2, len(rtts), figsize=(4.2 * len(rtts), 6.5), squeeze=False)
    colors = {"cloud-only": "tab:blue", "end-only": "tab:green", "naive": "tab:orange", "moetandem": "tab:red"}
    for j, rtt in enumerate(rtts):
        for k, c in enumerate(CONFIGS):
            thr, lat = [], []
            for bw in bws:
                sc = next((s for s in scs if s["bandwidth_mbit"] == bw and s["rtt_ms"] == rtt), None)
                r = next((r for r in sc["rows"] if r["config"] == c), None) if sc else None
                thr.append(r["throughput"][cmax] if r else float("nan"))
                lat.append(r["lat_p50_ms"] if r else float("nan"))
            x = [i + (k - 1.5) * 0.2 for i in range(len(bws))]
            axes[0][j].bar(x, thr, 0.2, label=c, color=colors[c])
            axes[1][j].bar(x, lat, 0.2, label=c, color=colors[c])
        for ax, yl in (((axes[0][j], f"tok/s @{cmax} requests"), (axes[1][j], "ms/token p50 (batch 1)"))):
            ax.set_xticks(range(len(bws)), [f"{b:g}" for b in bws])
            ax.set_xlabel("Mbit/s")
            ax.set_ylabel(yl)
            ax.set_title(f"RTT {rtt:g} ms")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("End–cloud split, demo MoE, emulated links (netns + tbf, app-layer RTT), 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from moetandem.assets import demo_model_path
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_model_path()))
    p.add_argument("--out", type=Path, default=ROOT / "out" / "split")
    p.add_argument("--scenarios", nargs="+", metavar="MBITxRTT", help="e.g. 10x10 100x100 (default: 4×3 grid)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--tokens", type=int, default=24, help="new tokens per request (24)")
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: requests sample (top_p 0.9, seeded)")
    p.add_argument("--latency-prompts", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--expert-budget", type=float, default=0.5, help="the end's expert budget (0.5)")
    p.add_argument("--codec-rank", type=int, default=28)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the end process (1)")
    p.add_argument("--ppl-data", default=str(ROOT.parent / "shared/data/eval/wikitext2_valid.txt"))
    p.add_argument("--ppl-tokens", type=int, default=512, help="0 = skip the quality pass")
    p.add_argument("--quality-ranks", type=int, nargs="*", default=[], help="also measure the perplexity of "
                   "the moetandem config at these codec ranks")
    p.add_argument("--calib-tokens", type=int, default=60000)
    p.add_argument("--loopback", action="store_true", help="no namespaces: loopback, bandwidth not limited")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quality", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cloud", help=argparse.SUPPRESS)
    p.add_argument("--token-file", help=argparse.SUPPRESS)
    p.add_argument("--rtt", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--rates", type=float, nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--netns-end", help=argparse.SUPPRESS)
    p.add_argument("--netns-cloud", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.concurrency = sorted(set(a.concurrency))
    if a.worker:
        return worker(a)
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
