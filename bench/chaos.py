"""Fault scenarios against `moetandem serve` (CPU, the demo MoE by default), each with streaming clients:

  sigterm       SIGTERM with 8 streams in flight (--drain-timeout 3: the longer streams are cut): every stream
                must end with `data: [DONE]`, finished or with an error event; the process exits 0 in time
  frozen-cloud  `serve --cloud` with 8 streams; the cloud is frozen (SIGSTOP) for 3 s, then resumed (SIGCONT);
                2 more requests with long prompts arrive while it is frozen (their prefill must not stall the
                others); reports the time from SIGCONT until the cloud computes again
  cancel-storm  64 streams, each dropped by its client after a few chunks; then 8 streams must complete
  live-budget   8 streams while POST /admin/expert-budget changes the committee every 0.25 s; the text must
                equal the same requests' text before (the committee's misses are exact)

    python bench/chaos.py [--model PATH] [--device cpu]
    python bench/chaos.py --soak-minutes M --streams 32 --budget 0.5 [--device cuda]   # the soak alone

  soak          N streams of random length (seeded) back to back for M minutes against `serve --expert-budget B`;
                after a warm-up (a quarter of the run, at most 5 min) RSS and GPU memory (allocated, reserved:
                /metrics) are sampled; reports failed requests and the drift of each from the end of the warm-up

Prints a markdown table: requests, completed, clean errors (an error event then [DONE], or 503 while draining),
5xx or cut (a 5xx other than the drain's 503, a body without [DONE], a connection error), the longest gap between
two chunks of one stream, and the server's RSS before and after the scenario.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
KEY = "chaos-bench-key-0123456789"
SCENARIOS = ["sigterm", "frozen-cloud", "cancel-storm", "live-budget"]
PROMPT = "the quick brown fox jumps over the lazy dog while a small model decides which experts to run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def metric(text: str, name: str, stat: str | None = None) -> float | None:
    """A value from a /metrics page: `name` (with label stat="..." when given)."""
    want = f'{name}{{stat="{stat}"}}' if stat else name
    return next((float(ln.split()[-1]) for ln in text.splitlines() if ln.split(" ")[0] == want), None)


class Server:
    """`python -m moetandem serve` in a subprocess, ready when /health answers 200."""

    def __init__(self, args: argparse.Namespace, tmp: Path, extra: list[str]) -> None:
        key = tmp / "key"
        key.write_text(KEY)
        self.port = free_port()
        cmd = [sys.executable, "-m", "moetandem", "serve", *([args.model] if args.model else []), "--port",
               str(self.port), "--device", args.device, "--api-key-file", str(key), "--log-level", "warning", *extra,
               *shlex.split(args.serve_args)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def stream(client: httpx.AsyncClient, max_tokens: int, drop_after: int | None = None,
                 chunks_seen: list[int] | None = None, prompt: str = PROMPT) -> dict[str, Any]:
    """One streaming completion. drop_after: disconnect after that many chunks (a cancelling client)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    r: dict[str, Any] = {"status": None, "done": False, "error": None, "text": "", "gap": 0.0, "chunks": 0}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            r["status"] = resp.status_code
            if resp.status_code != 200:
                r["error"] = (await resp.aread()).decode(errors="replace")[:200]
                return r
            last = None
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                now = time.perf_counter()
                if last is not None:
                    r["gap"] = max(r["gap"], now - last)
                last = now
                if line == "data: [DONE]":
                    r["done"] = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    r["error"] = obj["error"].get("code") or obj["error"].get("message")
                    continue
                r["text"] += obj["choices"][0].get("text", "")
                r["chunks"] += 1
                if chunks_seen is not None:
                    chunks_seen.append(1)
                if drop_after is not None and r["chunks"] >= drop_after:
                    r["dropped"] = True
                    return r  # leaving the context closes the connection mid-stream
    except httpx.HTTPError as e:
        r["error"] = f"{type(e).__name__}: {e}"
    return r


def tally(name: str, results: list[dict[str, Any]], before: float, after: float | str, note: str) -> dict:
    completed = sum(1 for r in results if r["status"] == 200 and r["done"] and r["error"] is None)
    clean = sum(1 for r in results if (r["status"] == 200 and r["done"] and r["error"] is not None)
                or (r["status"] == 503))
    dropped = sum(1 for r in results if r.get("dropped"))
    bad = len(results) - completed - clean - dropped
    return {"scenario": name, "requests": len(results), "completed": completed, "clean errors": clean,
            "5xx or cut": bad, "max gap s": max((r["gap"] for r in results), default=0.0),
            "RSS MiB before": before, "RSS MiB after": after, "note": note}


def client(srv: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"},
                             timeout=httpx.Timeout(60.0), limits=httpx.Limits(max_connections=128))


async def sigterm(args: argparse.Namespace, tmp: Path) -> dict:
    srv = Server(args, tmp, ["--max-batch", "8", "--drain-timeout", "3"])
    try:
        before = rss_mib(srv.proc.pid)
        seen: list[int] = []
        async with client(srv) as c:
            # 100 ... 800 tokens: the short ones finish within the drain, the long ones get the error event
            tasks = [asyncio.create_task(stream(c, 100 * (i + 1), chunks_seen=seen)) for i in range(8)]
            while len(seen) < 8 * 3:  # every stream is running
                await asyncio.sleep(0.02)
            peak = rss_mib(srv.proc.pid)
            t = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            late = await stream(c, 4)  # a request during the drain: 503
            results = [*await asyncio.gather(*tasks), late]
        rc = await asyncio.to_thread(srv.proc.wait, 10)
        return tally("SIGTERM `serve`, 8 streams, drain 3 s", results, before, f"{peak:.0f} (at SIGTERM)",
                     f"exit status {rc} after {time.monotonic() - t:.1f} s; +1 request during the drain (503)")
    finally:
        srv.stop()


async def frozen_cloud(args: argparse.Namespace, tmp: Path) -> dict:
    token = tmp / "token"
    token.write_text("chaos-bench-token-0123456789abcdef")
    cloud = subprocess.Popen([sys.executable, "-m", "moetandem", "cloud", *(["--model", args.model] if args.model
                                                                             else []),
                              "--listen", "127.0.0.1:0", "--token-file", str(token), "--device", args.device,
                              "--log-level", "error"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        port = json.loads(cloud.stdout.readline())["listening"]
        srv = Server(args, tmp, ["--max-batch", "10", "--cloud", f"127.0.0.1:{port}", "--token-file", str(token)])
        try:
            before = rss_mib(srv.proc.pid)
            seen: list[int] = []
            async with client(srv) as c:
                tasks = [asyncio.create_task(stream(c, 400, chunks_seen=seen)) for _ in range(8)]
                while len(seen) < 8 * 5:
                    await asyncio.sleep(0.02)
                os.kill(cloud.pid, signal.SIGSTOP)
                await asyncio.sleep(0.2)
                # long prompts arriving during the freeze: a prefill to a frozen cloud must not stall the others
                tasks += [asyncio.create_task(stream(c, 100, prompt=" ".join([PROMPT] * 8))) for _ in range(2)]
                await asyncio.sleep(2.8)
                forwards = metric((await c.get("/metrics")).text, "moetandem_split_stats", "cloud_forwards")
                os.kill(cloud.pid, signal.SIGCONT)
                resumed, recovery = time.monotonic(), None
                while recovery is None and time.monotonic() - resumed < 30:
                    now = metric((await c.get("/metrics")).text, "moetandem_split_stats", "cloud_forwards")
                    if now is not None and forwards is not None and now > forwards:
                        recovery = time.monotonic() - resumed
                    await asyncio.sleep(0.05)
                results = await asyncio.gather(*tasks)
                stats = (await c.get("/metrics")).text
            after = rss_mib(srv.proc.pid)
            fallbacks = metric(stats, "moetandem_split_stats", "fallbacks") or 0.0
            catch_up = metric(stats, "moetandem_split_stats", "catch_up_steps") or 0.0
            rec = f"{recovery:.2f} s" if recovery is not None else "not within 30 s"
            return tally("frozen cloud 3 s (SIGSTOP/SIGCONT), `serve --cloud`, 8 streams + 2 long prompts "
                         "during the freeze", results, before, after,
                         f"split fallbacks {fallbacks:.0f}; cloud used again {rec} after SIGCONT, after "
                         f"{catch_up:.0f} catch-up steps")
        finally:
            srv.stop()
    finally:
        os.kill(cloud.pid, signal.SIGCONT)
        cloud.kill()
        cloud.wait()


async def cancel_storm(srv: Server) -> dict:
    rng = random.Random(0)
    async with client(srv) as c:
        await asyncio.gather(*(stream(c, 64) for _ in range(8)))  # warm
        before = rss_mib(srv.proc.pid)
        dropped = await asyncio.gather(*(stream(c, 200, drop_after=rng.randint(1, 12)) for _ in range(64)))
        results = [*dropped, *await asyncio.gather(*(stream(c, 64) for _ in range(8)))]
        await asyncio.sleep(0.5)
        after = rss_mib(srv.proc.pid)
    n = sum(1 for r in results if r.get("dropped"))
    return tally("cancellation storm: 64 streams dropped mid-stream, then 8", results, before, after,
                 f"{n} dropped by their clients (not counted as errors)")


async def live_budget(srv: Server) -> dict:
    async with client(srv) as c:
        before = rss_mib(srv.proc.pid)
        ref = await asyncio.gather(*(stream(c, 150) for _ in range(8)))
        tasks = [asyncio.create_task(stream(c, 150)) for _ in range(8)]
        changes, budgets = 0, ["0.25", "0.75", "0.4", "1.0", "0.5"]
        while not all(t.done() for t in tasks):
            r = await c.post("/admin/expert-budget", json={"budget": budgets[changes % len(budgets)]})
            assert r.status_code == 200, r.text
            changes += 1
            await asyncio.sleep(0.25)
        results = list(await asyncio.gather(*tasks))
        after = rss_mib(srv.proc.pid)
    same = sum(1 for a, b in zip(ref, results) if a["text"] == b["text"] and a["done"])
    return tally("live expert budget (0.25-1.0, every 0.25 s), 8 streams", results, before, after,
                 f"{changes} budget changes; text equal to the run before: {same}/8")


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{v:.2f}" if k == "max gap s" else f"{v:.0f}" if isinstance(v, float)
                                      else str(v) for k, v in r.items()) + " |")
    return "\n".join(out)


async def soak(args: argparse.Namespace, tmp: Path) -> dict:
    srv = Server(args, tmp, ["--max-batch", str(args.streams), "--max-waiting", str(args.streams),
                             "--expert-budget", str(args.budget)])
    total = args.soak_minutes * 60
    warm = min(300.0, total / 4)
    rng = random.Random(0)
    t0 = time.monotonic()
    samples: list[tuple[float, float, float | None, float | None]] = []  # (t, RSS MiB, GPU alloc MiB, reserved)
    try:
        async with client(srv) as c:
            async def one_client(i: int) -> list[dict[str, Any]]:
                out = []
                while time.monotonic() - t0 < total:
                    out.append(await stream(c, rng.randint(16, 256)))
                return out

            async def sample() -> None:
                while time.monotonic() - t0 < total:
                    await asyncio.sleep(min(5.0, total / 20))
                    text = (await c.get("/metrics")).text
                    gpu = [metric(text, "moetandem_memory_bytes", k) for k in ("gpu_allocated", "gpu_reserved")]
                    samples.append((time.monotonic() - t0, rss_mib(srv.proc.pid),
                                    *(None if v is None else v / 2**20 for v in gpu)))

            results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(args.streams)), sample())
                       if rs for r in rs]
            tokens = metric((await c.get("/metrics")).text, "moetandem_generation_tokens_total") or 0.0
    finally:
        srv.stop()
    wall = time.monotonic() - t0
    after_warm = [s for s in samples if s[0] >= warm] or samples[-1:]

    def drift(k: int) -> str:
        if not after_warm or after_warm[0][k] is None:
            return "n/a"
        a, b = after_warm[0][k], after_warm[-1][k]
        return f"{a:.0f} -> {b:.0f} MiB ({100 * (b - a) / a:+.1f}%)"
    row = tally(f"soak {args.soak_minutes:g} min, {args.streams} streams, --expert-budget {args.budget}",
                results, after_warm[0][1] if after_warm else 0.0, after_warm[-1][1] if after_warm else 0.0,
                f"warm-up {warm:.0f} s; RSS {drift(1)}; GPU allocated {drift(2)}; reserved {drift(3)}; "
                f"{tokens / wall:.0f} tok/s")
    row["RSS MiB before"] = f"{row['RSS MiB before']:.0f} (after warm-up)"
    return row


async def run(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        want = set(args.scenarios)
        if args.soak_minutes:
            rows = [await soak(args, tmp)]
        else:
            rows = [await f(args, tmp) for name, f in (("sigterm", sigterm), ("frozen-cloud", frozen_cloud))
                    if name in want]
            if want & {"cancel-storm", "live-budget"}:
                srv = Server(args, tmp, ["--max-batch", "8", "--max-waiting", "128", "--expert-budget", "0.5"])
                try:
                    rows += [await f(srv) for name, f in (("cancel-storm", cancel_storm), ("live-budget", live_budget))
                             if name in want]
                finally:
                    srv.stop()
    print(table(rows))
    print(f"\nwall {time.monotonic() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: the demo MoE)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS, help="which to run (all)")
    p.add_argument("--serve-args", default="", metavar="FLAGS",
                   help="more flags for every `moetandem serve`, e.g. \"--compile off\" (one quoted string)")
    p.add_argument("--soak-minutes", type=float, default=0.0, metavar="M",
                   help="run only the soak, for M minutes (fractions work: 0.5 = 30 s)")
    p.add_argument("--streams", type=int, default=32, help="soak: concurrent streams (default 32)")
    p.add_argument("--budget", default="0.5", help="soak: --expert-budget of the server (default 0.5)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
