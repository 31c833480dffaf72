"""Cloud capacity (issue 18): how many ends one cloud GPU serves at a time-per-output-token target, as the number of
ends grows, batched across ends on the cloud.

    python bench/capacity.py --shape olmoe-1b-7b-4l --device cuda --ends 1,4,16,64 --new 64 --decode-tokens 8 \\
        --compare-batching --out out/capacity

Starts one `moetandem cloud` (a subprocess) and runs E thin ends (bench/thin_end.py: no weights, token ids up,
k greedy tokens per `decode` exchange down, the LM head's top-K in the cloud) as threads of this process, all
starting together: each prefills its prompt, then decodes --new tokens. Per ends count: aggregate tok/s (all
tokens / the wall time from the start to the last end's last token), the per-output-token time of each end's decode
phase (p50 / p95 / max over ends), the time to first token (p50), and whether every end's tokens equal those of a
full moetandem end (moetandem.load with the same split options, one request alone) for its prompt. Then the
capacity: the largest measured ends count whose TPOT p95 meets --tpot-ms. --compare-batching runs the sweep on a
cloud with batching across ends (the default) and on one without (--batch-max-rows 1). Writes capacity.md,
capacity.json and capacity.png to --out; exit 1 when some end's tokens differ from the reference."""
from __future__ import annotations

import argparse
import json
import re
import secrets
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.capacity_report import capacity, plot, table  # noqa: E402
from bench.thin_end import EndRun, ModelInfo, ThinEnd, cache_len, model_info  # noqa: E402

NO_BATCHING = ["--batch-max-rows", "1"]


def prompts_for(n: int, length: int, vocab: int) -> list[list[int]]:
    """n distinct prompts of `length` .. `length` - 3 token ids (different lengths: the rows of a batched step sit
    at different positions)."""
    return [[(7 * i + 3 * j + 5) % (vocab - 1) + 1 for j in range(max(1, length - i % 4))] for i in range(n)]


def references(model: Path, address: str, token: str, prompts: list[list[int]], new: int, topk: int,
               k: int) -> list[list[int]]:
    """Each prompt's tokens from a full moetandem end (its model on the CPU, unused: the plan is cloud-only), one
    request at a time, greedy."""
    import moetandem
    opts = {"head": 0, "tail": 0, "cloud_head_topk": topk, "cloud_decode_tokens": k, "micro_batches": 1,
            "timeout_s": 600.0, "deadline_floor_s": 600.0}
    eng = moetandem.load(model, device="cpu", progress=False, cloud=address, token=token, split=opts)
    try:
        out = [eng.generate([p], max_new_tokens=new, stop_on_eos=False)[0].token_ids for p in prompts]
        s = eng.split.split_stats()
    finally:
        eng.split.link.close()
    if s["local_forwards"] or s["fallbacks"] or (new > 1 and not s["decode_exchanges"]):
        raise SystemExit(f"capacity: the reference end did not decode in the cloud ({s['local_forwards']} local "
                         f"forwards, {s['fallbacks']} fallbacks, {s['decode_exchanges']} decode exchanges)")
    return out


def run_round(ends: list[ThinEnd], prompts: list[list[int]], new: int) -> tuple[list[EndRun], float]:
    """Every end generates at once (threads behind a barrier; gRPC releases the GIL): their runs and the wall
    time from the start to the last end's last token."""
    from bench.scaleout import run_together
    runs: list[Any] = [None] * len(ends)
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            runs[i] = ends[i].generate(prompts[i % len(prompts)], new)
        except Exception as e:  # CloudError / FrameError of an exchange, or anything else: the run fails
            errors.append(f"end {i}: {type(e).__name__}: {e}")

    wall = run_together(len(ends), one)
    if errors:
        raise SystemExit(f"capacity: {len(errors)} of {len(ends)} ends failed; {errors[0]}")
    return runs, wall


def measure(address: str, token: str, info: ModelInfo, n: int, prompts: list[list[int]], refs: list[list[int]],
            a: argparse.Namespace) -> dict[str, Any]:
    """n fresh thin ends: an unmeasured warm-up round (the cloud's kernels meet this batch size), then the measured
    one. Returns the row."""
    import numpy as np
    max_len = cache_len(info, max(map(len, prompts)) + a.new)
    ends = [ThinEnd(address, token, info, a.head_topk, a.decode_tokens, max_len) for _ in range(n)]
    try:
        for e in ends:
            e.connect()
        if a.warmup:
            run_round(ends, prompts, min(a.new, max(2 * a.decode_tokens + 1, 8)))
        runs, wall = run_round(ends, prompts, a.new)
    finally:
        for e in ends:
            e.close()
    tpot = np.array([r.tpot_s for r in runs]) * 1e3
    ttft = np.array([r.ttft_s for r in runs]) * 1e3
    differ = {i: first_difference(r.tokens, refs[i % len(refs)]) for i, r in enumerate(runs)
              if r.tokens != refs[i % len(refs)]}
    return {"ends": n, "tok_s": sum(len(r.tokens) for r in runs) / wall, "wall_s": wall,
            "tpot_p50_ms": float(np.percentile(tpot, 50)), "tpot_p95_ms": float(np.percentile(tpot, 95)),
            "tpot_max_ms": float(tpot.max()), "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "tokens_equal": not differ, "differ": differ, "tpot_ms": tpot.tolist(), "ttft_ms": ttft.tolist(),
            "exchanges": [len(r.exchanges) for r in runs], "exchange_tokens": [r.exchanges for r in runs],
            "tokens": [r.tokens for r in runs]}


def first_difference(a: list[int], b: list[int]) -> int:
    """The index of the first token where a and b differ (the shorter length when one is the other's prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cloud_flags(a: argparse.Namespace) -> list[str]:
    """--cloud-args, with quiet logging and enough sessions for the largest ends count (unless given)."""
    extra = shlex.split(a.cloud_args)
    if "--log-level" not in extra:
        extra += ["--log-level", "warning"]
    if "--max-sessions" not in extra:  # the ends of one count, those of the last closing, and the reference end
        extra += ["--max-sessions", str(2 * max(a.ends) + 8)]
    return extra


def run(a: argparse.Namespace) -> dict[str, Any]:
    """The sweep (per cloud configuration, per ends count); the reference once, on the first cloud."""
    from bench.scaleout import start_cloud
    model = Path(a.model) if a.model else shape_model(a.shape)
    info = model_info(model)
    prompts = prompts_for(a.distinct_prompts, a.prompt_len, info.vocab)
    if max(map(len, prompts)) + a.new > info.max_positions:
        raise SystemExit(f"capacity: prompt ({a.prompt_len}) + --new ({a.new}) exceeds the model's "
                         f"{info.max_positions} positions")
    a.out.mkdir(parents=True, exist_ok=True)
    tok = secrets.token_hex(16)
    token_file = a.out / "token"
    token_file.write_text(tok)
    configs = [("batching", []), ("no batching", NO_BATCHING)] if a.compare_batching else [("cloud", [])]
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": str(model),
                           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                           "rows": []}
    refs = None
    for name, flags in configs:
        log = a.out / f"cloud-{name.replace(' ', '-')}.log"
        with log.open("w") as err:
            started = start_cloud(str(model), token_file, a.device, cloud_flags(a) + flags, stderr=err)
        if started is None:
            raise SystemExit(f"capacity: the cloud ({name}) did not start: {last_line(log)}")
        proc, port = started
        address = f"127.0.0.1:{port}"
        try:
            if refs is None:
                t = time.perf_counter()
                refs = references(model, address, tok, prompts, a.new, a.head_topk, a.decode_tokens)
                print(f"[capacity] reference tokens of {len(prompts)} prompts in {time.perf_counter() - t:.0f} s",
                      flush=True)
            for n in a.ends:
                row = {"config": name, **measure(address, tok, info, n, prompts, refs, a)}
                res["rows"].append(row)
                print(f"[capacity] {name}: {n} ends {row['tok_s']:.1f} tok/s, TPOT p95 {row['tpot_p95_ms']:.1f} ms, "
                      f"tokens {'=' if row['tokens_equal'] else '!='} reference", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except Exception:
                proc.kill()
                proc.wait()
            res.setdefault("batching", {})[name] = batching_line(log)
    res["capacity"] = capacity(res["rows"], a.tpot_ms)
    return res


def last_line(log: Path) -> str:
    """The last line a failed cloud wrote (its one-line error)."""
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1].strip() if lines else f"no output (see {log})"


def batching_line(log: Path) -> str:
    """What the cloud said of its batching when it stopped (forwards, exchanges per forward), or ''."""
    found = re.search(r"batching: (.*)", log.read_text(errors="replace"))
    return found.group(1).strip() if found else ""


def shape_model(shape: str) -> Path:
    from bench.shapes import shape_checkpoint
    return shape_checkpoint(shape)


def ends_list(text: str) -> list[int]:
    try:
        ends = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma-separated list of ends counts, e.g. 1,4,16,64") from None
    if ends[0] < 1:
        raise argparse.ArgumentTypeError("ends counts must be >= 1")
    return ends


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory")
    src.add_argument("--shape", help="a bench/shapes.py random checkpoint (built under /tmp on first use), e.g. "
                     "olmoe-1b-7b-4l")
    p.add_argument("--ends", type=ends_list, default=[1, 4, 16, 64], help="ends counts (default 1,4,16,64)")
    p.add_argument("--new", type=int, default=64, help="tokens per end (default 64)")
    p.add_argument("--decode-tokens", type=int, default=8, metavar="K",
                   help="greedy tokens per decode exchange (default 8; 1: one exchange per token)")
    p.add_argument("--head-topk", type=int, default=64, metavar="K", help="top-K logits of the prefill (default 64)")
    p.add_argument("--tpot-ms", type=float, default=100.0, help="the TPOT target (default 100 ms)")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default 16; lengths vary by up to 3)")
    p.add_argument("--distinct-prompts", type=int, default=8, help="prompts (cycled over the ends; default 8)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="measure the first round (default: an unmeasured round first, per ends count)")
    p.add_argument("--device", default="auto", help="the cloud's device (cuda, cpu, auto)")
    p.add_argument("--cloud-args", default="", help='more `moetandem cloud` flags, e.g. "--batch-window-ms 2"')
    p.add_argument("--compare-batching", action="store_true",
                   help="run the sweep on a cloud with batching across ends and on one without (--batch-max-rows 1)")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "capacity")
    a = p.parse_args(argv)
    if a.new < 2 or a.decode_tokens < 1 or a.prompt_len < 1 or a.distinct_prompts < 1 or a.tpot_ms <= 0:
        p.error("--new >= 2, --decode-tokens >= 1, --prompt-len >= 1, --distinct-prompts >= 1, --tpot-ms > 0")
    if a.compare_batching and "--batch-max-rows" in a.cloud_args:
        p.error("--compare-batching sets --batch-max-rows itself; leave it out of --cloud-args")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    res = run(a)
    (a.out / "capacity.json").write_text(json.dumps(res, indent=1))
    md = table(res["rows"], res["capacity"], a.tpot_ms, res.get("batching", {}))
    (a.out / "capacity.md").write_text(md)
    plot(res["rows"], a.tpot_ms, a.out / "capacity.png")
    print(md)
    print(f"wrote {a.out / 'capacity.md'}, capacity.json, capacity.png")
    bad = [r for r in res["rows"] if not r["tokens_equal"]]
    for r in bad:
        print(f"tokens differ from the reference: {r['config']}, {r['ends']} ends: end -> first differing token "
              f"{r['differ']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
