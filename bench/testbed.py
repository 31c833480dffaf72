"""End–cloud test bed (issue 18): one `moetandem cloud` serving 1..N end processes over emulated links, with the
baselines and the adaptive plan in the same run. Each end is a separate process with a few torch threads and a
RAM expert budget; the link (rate, RTT, jitter, loss) is emulated in the transport by split.shaper, both
directions on the end (so the end can change it between scenarios without restarting anything). Configs:

  end-only   no cloud; the committee at the end's budget
  cloud-only token ids up, everything in the cloud (--split-head 0 --split-tail 0), last hidden states down
  naive      fixed cut (1 head + 1 tail layer on the end), fp16 activations, no codec, 1 micro-batch
  adaptive   split.plan.make_split_plan on a measured SplitProfile (measured_profile: per-layer fixed + per-token
             costs of end and cloud, calibrated to this run's end-only / cloud-only steps at two batch sizes;
             the link from the LinkMonitor; codecs from the calibration file), guarded by the baselines'
             measured throughput (guard_with_measured); re-plans when the link changes
--cloud-head-topk K: cloud-only and adaptive run the LM head in the cloud (top-K logits down, split/logits.py), and
  cloud-only-end-head (cloud-only with the head on the end, as without the flag) runs too: the A/B in one run
--cloud-decode-tokens K (with --cloud-head-topk): cloud-only and adaptive decode K tokens per exchange in
  the cloud (split/decode.py), and cloud-only-per-token (one exchange per token, head in the cloud) runs too

    python bench/testbed.py --quick --out out/testbed                                  # CPU, demo, minutes
    python bench/testbed.py --model DIR --cloud-device cuda --out out/testbed-gpu       # GPU host, full grid
    python bench/testbed.py --gpu --time-limit 220 --cloud-head-topk 64                 # the cloud head A/B
    python bench/testbed.py --gpu --time-limit 420 --rates 50 100 --rtts 20 50 --ends 1 --cloud-head-topk 64 \\
        --cloud-decode-tokens 8                                                          # k tokens per exchange A/B
Prints a table (tok/s over all ends, p50/p95 ms/token, link bytes per token per crossing, adaptive / best
baseline) and writes testbed.json, testbed.md and testbed.png (speedup vs link rate per RTT) to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.split import measure, prompts_for  # noqa: E402
from bench.testbed_profile import measured_profile, prompt_ids  # noqa: E402
from bench.testbed_report import AUTO_PLAN, END_HEAD, PER_TOKEN  # noqa: E402

CONFIGS = ("end-only", "cloud-only", "naive", "adaptive")
FULL = dict(rates=[10, 50, 100, 1000], rtts=[5, 20, 50, 100], budgets=[0.25, 0.5], ends=[1, 4, 16])
QUICK = dict(rates=[10, 1000], rtts=[5, 50], budgets=[0.5], ends=[1, 2])
#: --gpu: the cloud on the GPU (bf16), ends as CPU processes; a 4-layer slice of the OLMoE-1B-7B shape (layer speed
#: and memory are OLMoE's; the build takes seconds), cut off at --time-limit (default 180 s) with what finished
GPU = dict(rates=[10, 100, 1000], rtts=[20], budgets=[0.25], ends=[1, 4], shape="olmoe-1b-7b-4l")


def configs(a: argparse.Namespace) -> tuple[str, ...]:
    """The configs of this run: CONFIGS, with --cloud-head-topk the cloud-only run with the head on the end, with
    --cloud-decode-tokens the cloud-only run with one exchange per token."""
    return CONFIGS + ((END_HEAD,) if a.cloud_head_topk else ()) + ((PER_TOKEN,) if a.cloud_decode_tokens else ()) \
        + ((AUTO_PLAN,) if a.auto_plan else ())


def options(config: str, a: argparse.Namespace) -> dict[str, Any] | None:
    link = {"emulate_rate_mbit": a.rates[0], "emulate_rtt_ms": a.rtts[0], "emulate_jitter_ms": a.jitter_ms,
            "emulate_loss": a.loss, "emulate_down": True, "timeout_s": 60.0}
    head = {"cloud_head_topk": a.cloud_head_topk} if a.cloud_head_topk else {}  # the LM head in the cloud
    if config in ("adaptive", "cloud-only", AUTO_PLAN):  # k tokens per exchange
        head.update({"cloud_decode_tokens": a.cloud_decode_tokens} if a.cloud_decode_tokens else {})
    if config in ("cloud-only", END_HEAD, PER_TOKEN):
        opts = {**link, "head": 0, "tail": 0, "codec": "off", "micro_batches": 1}
        return opts if config == END_HEAD else {**opts, **head}
    if config == "naive":
        return {**link, "head": 1, "tail": 1, "codec": "fp16", "micro_batches": 1}
    if config == "adaptive":  # codec per crossing from the plan; the cloud's measured step costs in hello
        return {**link, "head": 1, "tail": 1, "codec": "plan", "micro_batches": 1, "request_costs": True, **head}
    if config == AUTO_PLAN:  # the end plans alone (split/auto.py)
        return {**link, "plan": "auto", "codec": "plan", **head}
    return None


def set_link(eng: Any, rate: float, rtt: float) -> None:
    link = eng.split.link
    for sh in (link.shaper, link.down_shaper):
        sh.set_rate(rate)
        sh.set_rtt(rtt)


def worker(a: argparse.Namespace) -> int:
    """One end: per budget, an engine per config, then every link; in step with the other ends (barrier)."""
    import torch
    import moetandem
    from moetandem.analysis.trace import trace_ids
    from moetandem.split.connect import Placement, profile_replanner
    from moetandem.split.costs import measure_step_costs
    from moetandem.split.plan import baseline_plans, guard_with_measured, make_split_plan
    torch.set_num_threads(a.threads)
    t0 = time.monotonic()

    def note(msg: str) -> None:  # timestamped progress on stderr: where a cut run's time went
        if a.index == 0:
            print(f"[testbed] end 0, {time.monotonic() - t0:.0f} s: {msg}", file=sys.stderr, flush=True)
    cs = configs(a)

    def load_budget(b: float) -> tuple[dict[str, Any], Any, list[list[float]]]:
        """This budget's engine per config, warmed up, the end's own step costs and its routing frequencies
        on the run's prompts (the plan keeps an end layer's most used experts local). One budget's engines at a
        time: six OLMoE-slice engines take ~40 GB in float32 (the tenth session's four test beds ran the host out of
        memory and an end died without a word)."""
        def split_kw(c: str) -> dict[str, Any]:
            opts = options(c, a)
            return {"cloud": a.cloud, "token_file": a.token_file, "split": opts} if opts else {}
        engs = {c: moetandem.load(a.model, device="cpu", dtype=a.end_dtype, progress=False, expert_budget=b,
                                  **split_kw(c)) for c in cs}
        e = engs["end-only"]  # the end's own step costs: its layers with its committee, quiet-box minimum
        costs = measure_step_costs(e.model, e.experts, "cpu", sizes=(1, max(a.concurrency)))
        freq = trace_ids(e, prompt_ids(e), progress=False).frequencies(e.args.num_layers)  # the prompts' routing
        note(f"budget {b:g}: {len(engs)} engines loaded, step costs and routing measured")
        for eng in engs.values():  # unmeasured: each path's first use on both sides (the GPU test bed measured a
            # cold cloud-only round at 1.8 tok/s, then 114, and the plan trusted the cold one)
            eng.generate(prompts_for(eng)[:max(a.concurrency)], max_new_tokens=4, stop_on_eos=False)
        note(f"budget {b:g}: every path warmed up")
        return engs, costs, freq
    conc = max(a.concurrency)
    out = []
    step = 0
    for b in a.budgets:
        engines, end_costs, freq = load_budget(b)
        for rtt, rate in ((rtt, rate) for rtt in a.rtts for rate in a.rates):
            runs: dict[str, list[dict]] = {c: [] for c in cs}
            predicted: dict[str, float] = {}
            plan, model = "", {}
            # round 0: the baselines (the plan is made from them); then `repeats` rounds of all four,
            # interleaved, so a load spike on this shared machine hits every config alike
            order = [c for c in cs if c != "adaptive"] + \
                [c for r in range(a.repeats) for c in (cs[r % len(cs):] + cs[:r % len(cs)])]
            for i, c in enumerate(order):
                eng = engines[c]
                if c != "end-only" and not runs[c]:
                    set_link(eng, rate, rtt)
                if c == "adaptive" and not runs[c]:  # warm up (prefill + decode frames: the link fit), plan
                    eng.split.replanner = None
                    eng.split.set_plan(Placement(1, 1, None, None, 1))
                    eng.split.link.monitor.reset()  # this scenario's link only
                    eng.generate(prompts_for(eng)[:2], max_new_tokens=8, stop_on_eos=False)
                    prof = measured_profile(end_costs, eng, {k: v[0] for k, v in runs.items() if v}, b, conc,
                                            overlap=a.cloud_device != "cpu", head_topk=a.cloud_head_topk,
                                            decode_tokens=a.cloud_decode_tokens, routing_freq=freq)
                    bases = baseline_plans(prof, "throughput")
                    seen = {k: v[0]["throughput"][str(conc)] for k, v in runs.items() if v}
                    p = guard_with_measured(make_split_plan(prof, "throughput"), bases, seen)
                    eng.split.set_plan(p)
                    eng.generate(prompts_for(eng)[:2], max_new_tokens=16, stop_on_eos=False)  # the committee adapts
                    eng.split.replanner = profile_replanner(prof, "throughput", current=p)
                    plan = p.describe()
                    predicted = {k: v.predicted_throughput_tok_s for k, v in bases.items()}
                    predicted["adaptive"] = p.predicted_throughput_tok_s
                    model = {"bandwidth_Bps": prof.bandwidth_bps, "rtt_ms": prof.rtt_s * 1e3,
                             "end_ms": [1e3 * sum(prof.end_layer_fixed_s) + 1e3 * prof.end_step_overhead_s,
                                        1e3 * (sum(prof.end_layer_s) + prof.end_head_s)],
                             "cloud_ms": [1e3 * sum(prof.cloud_layer_fixed_s) + 1e3 * prof.cloud_step_overhead_s,
                                          1e3 * sum(prof.cloud_layer_s)],
                             # every scalar and per-layer list of the profile: the prediction can be redone offline
                             "profile": {k: v for k, v in asdict(prof).items()
                                         if k not in ("routing_freq", "cut_codecs")}}
                step += 1
                barrier(a, step)
                runs[c].append(measure(c, eng, a))
                if eng.split is not None:  # the cloud's load this run saw (its costs are calibrated under it)
                    mon = eng.split.link.monitor
                    runs[c][-1].update(cloud_queue=mon.cloud_queue_depth, cloud_replicas=mon.cloud_replicas)
                if c == AUTO_PLAN:  # the plan the end ended this run on
                    runs[c][-1]["plan"] = getattr(eng.split.plan, "describe", lambda: "the default placement")()
            for c in cs:  # the run of (lower) median throughput over the interleaved rounds
                r = median_run(runs[c], c != "adaptive", conc)
                r.update(config=c, rate=rate, rtt=rtt, budget=b, end=a.index, plan=plan if c == "adaptive"
                         else r.get("plan", ""), predicted_tok_s=predicted.get(c, float("nan")),
                         runs=len(runs[c]) - int(c != "adaptive" and len(runs[c]) > 1),
                         all_tok_s=[x["throughput"][str(conc)] for x in runs[c]],
                         model=model if c == "adaptive" else {})
                out.append(r)
            Path(a.result).write_text(json.dumps(out))  # after every scenario: a run cut short keeps them
            note(f"{rate:g} Mbit/s, {rtt:g} ms, budget {b:g} done")
        for eng in engines.values():  # before the next budget's load: its sessions on the cloud, its memory
            if eng.split is not None:
                eng.split.link.close()
        engines = eng = None
        gc.collect()
    return 0


def median_run(runs: list[dict], probed: bool, conc: int) -> dict:
    """The run of lower-median throughput over a config's interleaved rounds. probed: runs[0] is the round-0 probe
    the plan was made from (baselines only): left out, so every config is judged on the same number of rounds (the
    seventh session's GPU run kept the better of a baseline's two runs against adaptive's one: 0.81x for the same
    plan)."""
    rs = sorted(runs[1:] if probed and len(runs) > 1 else runs, key=lambda r: r["throughput"][str(conc)])
    return rs[(len(rs) - 1) // 2]


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
                              "warning", "--device", a.cloud_device, "--dtype", a.cloud_dtype, "--compile", "off"],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "args": vars(a) | {"out": str(a.out)},
                           "rows": []}
    t0 = time.time()
    try:
        first = cloud.stdout.readline()
        if not first.strip():
            raise SystemExit("the cloud process ended before listening; its error is printed above")
        addr = f"127.0.0.1:{json.loads(first)['listening']}"
        for n in a.ends:
            if a.time_limit and time.time() - t0 > a.time_limit:
                print(f"[testbed] time limit: {n} ends not run", flush=True)
                break
            sync = a.out / f"sync-{n}"
            sync.mkdir(exist_ok=True)
            for f in sync.iterdir():
                f.unlink()
            procs = []
            for i in range(n):
                (a.out / f"end-{n}-{i}.json").unlink(missing_ok=True)
                cmd = [sys.executable, __file__, "--worker", "--index", str(i), "--n-ends", str(n), "--cloud", addr,
                       "--token-file", str(tok), "--sync", str(sync), "--result", str(a.out / f"end-{n}-{i}.json")]
                cmd += sys.argv[1:] + ["--model", a.model]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": str(a.threads)}))
            cut = wait_ends(procs, t0 + a.time_limit if a.time_limit else None)
            res["rows"] += complete_rows(a, n)
            print(f"[testbed] {n} end(s) {'cut at the time limit' if cut else 'done'}, {time.time() - t0:.0f} s",
                  flush=True)
            write(res, a.out, time.time() - t0)
    finally:
        cloud.terminate()
        cloud.wait(10)
    print(write(res, a.out, time.time() - t0))
    return 0


def wait_ends(procs: list[subprocess.Popen], deadline: float | None) -> bool:
    """Wait for the end processes; at the deadline stop them (their finished scenarios are kept). True if cut."""
    while any(p.poll() is None for p in procs):
        if deadline is not None and time.time() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            return True
        time.sleep(0.2)
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if failed:
        why = ", ".join(f"end {i}: " + (f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}") for i, rc in failed)
        raise SystemExit(f"an end process failed ({why}); its own error, if it printed one, is above")
    return False


def complete_rows(a: argparse.Namespace, n: int) -> list[dict]:
    """The rows of the scenarios every one of the n ends finished."""
    per_end = []
    for i in range(n):
        f = a.out / f"end-{n}-{i}.json"
        per_end.append(json.loads(f.read_text()) if f.exists() else [])
    done = set.intersection(*({(r["rate"], r["rtt"], r["budget"]) for r in rows} for rows in per_end))
    return [{**r, "ends": n} for rows in per_end for r in rows if (r["rate"], r["rtt"], r["budget"]) in done]


def write(res: dict[str, Any], out: Path, wall_s: float) -> str:
    from bench.testbed_report import plot, table
    res["wall_s"] = wall_s
    (out / "testbed.json").write_text(json.dumps(res, indent=1, default=str))
    if not res["rows"]:
        return "no scenario finished"
    md = table(res)
    (out / "testbed.md").write_text(md)
    plot(res, out / "testbed.png")
    return md


def gpu_preset(a: argparse.Namespace, argv: list[str]) -> None:
    """--gpu: defaults for one GPU host (flags given explicitly win); builds the checkpoint once."""
    given = {x.split("=")[0] for x in argv if x.startswith("--")}
    for flag, v in (("--cloud-device", "cuda"), ("--cloud-dtype", "bfloat16"), ("--threads", 2),
                    ("--end-dtype", "bfloat16"), ("--repeats", 3), ("--time-limit", 180.0)):
        if flag not in given:
            setattr(a, flag[2:].replace("-", "_"), v)
    if "--model" not in given:
        from bench.shapes import shape_checkpoint
        a.model = str(Path("/tmp") / f"moetandem-{a.shape}" if a.worker else shape_checkpoint(a.shape))


def main(argv: list[str] | None = None) -> int:
    from moetandem.assets import demo_model_path
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_model_path()))
    p.add_argument("--out", type=Path, default=ROOT / "out" / "testbed")
    p.add_argument("--quick", action="store_true",
                   help="reduced grid: 10/1000 Mbit × 5/50 ms, budget 0.5, 1 and 2 ends")
    p.add_argument("--gpu", action="store_true", help="GPU preset: cloud on cuda (bf16), OLMoE-shaped 4-layer "
                   "random checkpoint (built under /tmp when --model is not given), 10/100/1000 Mbit × 20 ms, "
                   "budget 0.25, 1 and 4 ends of 2 threads, 3 rounds, --time-limit 180")
    p.add_argument("--shape", default=GPU["shape"], help="with --gpu and no --model: the bench/shapes.py random "
                   f"checkpoint built under /tmp (default {GPU['shape']}; e.g. qwen3-30b-a3b-4l)")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop starting/running ends after this many "
                   "seconds and report the scenarios that finished (0: none)")
    p.add_argument("--rates", type=float, nargs="+", help="Mbit/s (full: 10 50 100 1000)")
    p.add_argument("--rtts", type=float, nargs="+", help="ms (full: 5 20 50 100)")
    p.add_argument("--budgets", type=float, nargs="+", help="end expert budgets (0.25 0.5)")
    p.add_argument("--ends", type=int, nargs="+", help="end processes (1 4 16)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per end process (1)")
    p.add_argument("--cloud-threads", type=int, default=2)
    p.add_argument("--end-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the ends' dtype (--gpu: bfloat16: an end holds a budget's six engines in ~16 GB, and decodes "
                        "2.3x faster than in float32 on a CPU with AVX512-BF16)")
    p.add_argument("--cloud-device", default="cpu")
    p.add_argument("--cloud-dtype", default="float32")
    p.add_argument("--tokens", type=int, default=8, help="new tokens per request")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: every request samples (top_p 0.9, seeded): with --cloud-decode-tokens, the sampled "
                        "k-token exchanges (0: greedy)")
    p.add_argument("--latency-prompts", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="rounds of every config per scenario (median kept)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[4], help="requests per end (throughput)")
    p.add_argument("--cloud-head-topk", type=int, default=0, metavar="K",
                   help="cloud-only and adaptive run the LM head in the cloud and send the top-K logits down "
                        f"(naive stays fixed); adds {END_HEAD} (the head on the end) for the A/B (0: off)")
    p.add_argument("--cloud-decode-tokens", type=int, default=0, metavar="K",
                   help="with --cloud-head-topk: cloud-only and adaptive decode K tokens per exchange in the "
                        f"cloud; adds {PER_TOKEN} (one exchange per token) for the A/B (0: off)")
    p.add_argument("--auto-plan", action="store_true",
                   help=f"add the {AUTO_PLAN!r} config: the end plans alone (--split-plan auto: its own and the "
                        "cloud's raw timings and the live link, no baseline runs), beside the test bed's adaptive")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--index", "--n-ends"):
        p.add_argument(flag, type=int, help=argparse.SUPPRESS)
    for flag in ("--cloud", "--token-file", "--sync", "--result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cloud_head_topk < 0:
        p.error(f"--cloud-head-topk {a.cloud_head_topk}: K >= 1 (the logits sent per token, e.g. 64), or 0 for off")
    if a.cloud_decode_tokens < 0 or a.cloud_decode_tokens and not a.cloud_head_topk:
        p.error(f"--cloud-decode-tokens {a.cloud_decode_tokens}: K >= 1 with --cloud-head-topk (the cloud decodes "
                "with its own LM head), or 0 for off")
    if a.gpu:
        gpu_preset(a, argv if argv is not None else sys.argv[1:])
    grid = GPU if a.gpu else QUICK if a.quick else FULL
    for k in ("rates", "rtts", "budgets", "ends"):
        if getattr(a, k) is None:
            setattr(a, k, grid[k])
    return worker(a) if a.worker else orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
