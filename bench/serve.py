"""Load generator for the OpenAI-compatible server: TTFT, TPOT, ITL (p50/p95/p99) and throughput at several
concurrencies, over streaming /v1/completions (``ignore_eos``, so every request generates --max-tokens).

Against a running server:            python bench/serve.py --url http://127.0.0.1:8000 --api-key KEY
Starting one (a separate process):   python bench/serve.py --model PATH --max-batch 16 --device cuda \
                                         [--serve-args "--expert-budget 0.5"]

Prints a markdown table and writes serve.json, serve.md and serve.png to --out.
  TTFT  request sent -> first text chunk            TPOT  (end - first chunk) / (completion tokens - 1)
  ITL   gap between consecutive text chunks        throughput  completion tokens / wall time of the level
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over the lazy dog while a small model decides which experts to run".split()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str | list[int],
                      max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    chunks: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": obj["error"]["message"]}
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if any(c.get("text") for c in obj.get("choices", [])):
                chunks.append(time.perf_counter())
    end = time.perf_counter()
    if not chunks:
        return {"error": "no text streamed"}
    ttft = chunks[0] - t0
    return {"ttft": ttft, "itl": [b - a for a, b in zip(chunks, chunks[1:])], "e2e": end - t0, "tokens": tokens,
            "tpot": (end - chunks[0]) / (tokens - 1) if tokens > 1 else None}


def make_prompts(n: int, words: int, tokens: bool, same: bool) -> list[str] | list[list[int]]:
    """n prompts of `words` words (or token ids from 100 up), each a different rotation of the word list / id range,
    so concurrent greedy requests do not decode the same sequence (whose rows would route alike and flatter an
    expert cache); same: n copies of the first (the old behaviour)."""
    def ids(i: int) -> list[int]:
        return [100 + (j + 37 * i) % 1000 for j in range(words)]

    def text(i: int) -> str:
        return " ".join(WORDS[(j + 7 * i) % len(WORDS)] for j in range(words))
    make = ids if tokens else text
    return [make(0 if same else i) for i in range(n)]  # type: ignore[return-value]


async def run_level(url: str, headers: dict[str, str], model: str | None, concurrency: int, n_requests: int,
                    prompts: list[str] | list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Request i sends prompts[i % len(prompts)]."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=httpx.Timeout(600.0),
                                 limits=limits) as client:
        async def guarded(i: int) -> dict[str, Any]:
            async with sem:
                return await one_request(client, model, prompts[i % len(prompts)], max_tokens)

        await one_request(client, model, prompts[0], 4)  # warm-up (connections, first-use allocations)
        t = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(n_requests)))
        wall = time.perf_counter() - t
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["ttft"] for r in ok]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    row: dict[str, Any] = {"concurrency": concurrency, "requests": n_requests, "ok": len(ok), "errors": len(errors),
                           "wall_s": wall, "output_tok_s": tokens / wall, "req_s": len(ok) / wall,
                           "completion_tokens": tokens}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 95, 99):
            row[f"{name}_p{q}_ms"] = percentile(xs, q) * 1000
        row[f"{name}_mean_ms"] = statistics.fmean(xs) * 1000 if xs else float("nan")
    if errors:
        row["first_error"] = errors[0]
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moetandem.serve", str(args.model), "--port", str(port), "--device", args.device,
           "--max-batch", str(args.max_batch), "--max-waiting", str(max(args.requests_max, 64)),
           "--log-level", "warning", *shlex.split(args.serve_args)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("the server did not become healthy in time")


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> str:
    head = ("| concurrency | req | ok | TTFT p50 / p95 / p99 ms | TPOT p50 / p95 / p99 ms | ITL p50 / p95 / p99 ms "
            "| output tok/s | req/s |")
    lines = [f"{meta['model']} @ {meta['url']}: prompt ≈{meta['prompt_tokens']} tokens, {meta['max_tokens']} "
             "generated tokens per request (ignore_eos), greedy, streaming", "", head, "|---" * 8 + "|"]

    def trio(r: dict[str, Any], name: str) -> str:
        return " / ".join(f"{r[f'{name}_p{q}_ms']:.1f}" for q in (50, 95, 99))

    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {trio(r, 'ttft')} | {trio(r, 'tpot')} | "
                     f"{trio(r, 'itl')} | {r['output_tok_s']:.1f} | {r['req_s']:.2f} |")
    failed = [r for r in rows if r["errors"]]
    if failed:
        lines += ["", *(f"concurrency {r['concurrency']}: {r['errors']} request(s) failed, first: {r['first_error']}"
                        for r in failed)]
    table = "\n".join(lines)
    (out / "serve.md").write_text(table + "\n")
    (out / "serve.json").write_text(json.dumps({"meta": meta, "levels": rows}, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no PNG)", file=sys.stderr)
        return table
    rows = [r for r in rows if r["ok"] > 1]
    if not rows:
        print("(no level succeeded: no PNG)", file=sys.stderr)
        return table
    cs = [r["concurrency"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(cs, [r["output_tok_s"] for r in rows], "o-", color="tab:blue")
    a.set(xlabel="concurrent requests", ylabel="generated tokens / s", title="throughput", xscale="log", xticks=cs)
    a.set_xticklabels([str(c) for c in cs])
    for name, color in (("ttft", "tab:red"), ("tpot", "tab:green"), ("itl", "tab:orange")):
        b.plot(cs, [r[f"{name}_p50_ms"] for r in rows], "o-", color=color, label=f"{name.upper()} p50")
        b.fill_between(cs, [r[f"{name}_p50_ms"] for r in rows], [r[f"{name}_p95_ms"] for r in rows], color=color,
                       alpha=0.15)
    b.set(xlabel="concurrent requests", ylabel="ms (band: p50..p95)", title="latency", xscale="log",
          yscale="log", xticks=cs)
    b.set_xticklabels([str(c) for c in cs])
    b.legend()
    fig.suptitle(f"moetandem serve: {meta['model']}")
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", type=Path, help="checkpoint to serve from a server process started here")
    ap.add_argument("--api-key", default=os.environ.get("MOETANDEM_API_KEY"), help="Bearer key, if the server has one")
    ap.add_argument("--served-model", help="model id to send (default: the first of /v1/models)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 4 x concurrency, >= 8)")
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--token-prompt", action="store_true", help="send the prompt as --prompt-words token ids (a "
                    "checkpoint without a tokenizer, e.g. bench/shapes.py)")
    ap.add_argument("--same-prompt", action="store_true", help="every request sends the same prompt (default: each "
                    "its own rotation of the words, so greedy requests do not decode one sequence)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=16, help="with --model: KV-cache slots of the server")
    ap.add_argument("--device", default="auto", help="with --model: auto | cpu | cuda")
    ap.add_argument("--serve-args", default="", help="with --model: more server options, e.g. "
                    "\"--expert-budget 0.5 --policy fetch\"")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=Path("out/serve"))
    args = ap.parse_args()
    per_level = {c: args.requests or max(8, 4 * c) for c in args.concurrency}
    args.requests_max = max(per_level.values())
    args.out.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url.rstrip("/") if args.url else None
    if url is None:
        proc, url = start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        listed = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
        model = args.served_model or listed[0]["id"]
        prompts = make_prompts(args.requests_max, args.prompt_words, args.token_prompt, args.same_prompt)
        prompt = prompts[0]
        rows = []
        for c in args.concurrency:
            rows.append(asyncio.run(run_level(url, headers, model, c, per_level[c], prompts, args.max_tokens)))
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                  flush=True)
        probe = httpx.post(f"{url}/v1/completions", headers=headers, timeout=60,
                           json={"model": model, "prompt": prompt, "max_tokens": 1}).json()
        meta = {"url": url, "model": model, "prompt_words": args.prompt_words, "max_tokens": args.max_tokens,
                "prompt_tokens": probe.get("usage", {}).get("prompt_tokens"), "started_server": proc is not None,
                "max_batch": args.max_batch if proc is not None else None,
                "serve_args": args.serve_args if proc is not None else None, "time": time.strftime("%Y-%m-%d %H:%M")}
        print(report(rows, meta, args.out))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
