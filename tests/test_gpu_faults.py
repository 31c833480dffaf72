"""Faults under load with a Parameter Committee (issue 20): a server whose committee holds half the expert bytes of
a small random OLMoE checkpoint runs many concurrent streams while

  - the expert budget changes live (POST /admin/expert-budget) and a third of expert copies into slots fail (an
    injected error in background swaps and in the loads of a budget change), and
  - the KV cache is full (more requests than batch slots + queue; requests longer than the context),

and every request completes (with the all-resident tokens: misses are exact) or gets a clean 4xx; the server stays
healthy; GPU memory returns to its baseline. The CPU variants are small and run in CI (seconds); the CUDA variants
(64 streams, a budget change every second) are marked `gpu`:

    python -m pytest -q -m gpu tests/test_gpu_faults.py
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_serve import KEY, build_tiny_model

import moetandem
from moetandem.serve.app import create_app
from moetandem.serve.server_thread import ServerThread

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, CUDA])]
#: per device: concurrent streams, batch slots, new tokens per stream, seconds between budget changes
SCALE = {"cpu": dict(streams=8, batch=4, tokens=24, every=0.15),
         "cuda": dict(streams=64, batch=16, tokens=96, every=1.0)}
PROMPTS = ["the quick brown fox", "hello world", "the lazy dog jumps over the fox"]
BUDGETS = ["0.25", "0.75", "0.4", "1.0", "0.5"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("olmoe"), family="olmoe")


def load(path: Path, device: str, **kw: Any) -> moetandem.Engine:
    return moetandem.load(path, device=device, dtype="float32", progress=False, **kw)


def gpu_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


async def stream(c: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streaming completion: its status, text, whether it ended with [DONE], and the error event if any."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    r: dict[str, Any] = {"status": None, "text": "", "done": False, "error": None}
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        r["status"] = resp.status_code
        if resp.status_code != 200:
            r["error"] = json.loads(await resp.aread())["error"]
            return r
        async for line in resp.aiter_lines():
            if line == "data: [DONE]":
                r["done"] = True
            elif line.startswith("data: "):
                obj = json.loads(line[6:])
                if "error" in obj:
                    r["error"] = obj["error"]
                else:
                    r["text"] += obj["choices"][0]["text"]
    return r


def client(srv: ServerThread) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"},
                             timeout=httpx.Timeout(300.0), limits=httpx.Limits(max_connections=256))


def flaky(fn: Any, every: int) -> Any:
    """fn failing on every `every`-th call."""
    calls = itertools.count(1)

    def fn_or_fail(*args: Any, **kw: Any) -> Any:
        if next(calls) % every == 0:
            raise RuntimeError("injected: copying an expert into its slot failed")
        return fn(*args, **kw)
    return fn_or_fail


class FlakyHost:
    """The swapper's view of the host copies, whose reads fail now and then (the misses' own reads still work)."""

    def __init__(self, host: Any, every: int) -> None:
        self.get = flaky(host.get, every)


def inject_failed_swaps(prov: Any, every: int = 3) -> None:
    """Every `every`-th expert copy fails: background swaps (the swapper's host read) and the synchronous loads of a
    budget change."""
    prov.swapper.host = FlakyHost(prov.copies, every)
    prov.load = flaky(prov.load, every)


def heal(prov: Any) -> None:
    prov.swapper.host = prov.copies
    del prov.load


@pytest.mark.parametrize("device", DEVICES)
def test_budget_churn_and_failed_swaps_under_load(model_dir: Path, device: str) -> None:
    s = SCALE[device]
    n, tokens = s["streams"], s["tokens"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    full = load(model_dir, device)
    want = {p: full.decode_text(full.generate([full.encode(p)], max_new_tokens=tokens, stop_on_eos=False)[0].token_ids)
            for p in PROMPTS}
    del full
    eng = load(model_dir, device, expert_budget=0.5, policy="auto")
    app = create_app(eng, model_id="tiny", api_key=KEY, max_batch=s["batch"], max_waiting=n)

    async def scenario(srv: ServerThread) -> tuple[list[dict[str, Any]], int, int]:
        async with client(srv) as c:
            await asyncio.gather(*(stream(c, p, 4) for p in PROMPTS))  # warm-up: graphs, allocator
            base = gpu_bytes(device)
            prov = eng.provider
            inject_failed_swaps(prov)  # from now on a third of expert copies fail
            tasks = [asyncio.create_task(stream(c, p, tokens)) for p in prompts]
            changes, failed_changes = 0, 0
            while not all(t.done() for t in tasks) or changes < 3:  # at least 3 changes, however fast streams end
                r = await c.post("/admin/expert-budget", json={"budget": BUDGETS[changes % len(BUDGETS)]})
                assert r.status_code in (200, 500), r.text  # 500: this change's allocation failed, cleanly
                failed_changes += r.status_code == 500
                changes += 1
                await asyncio.sleep(s["every"])
            results = list(await asyncio.gather(*tasks))
            heal(prov)  # copies work again
            assert (await c.post("/admin/expert-budget", json={"budget": "0.5"})).status_code == 200
            await asyncio.gather(*(stream(c, p, 4) for p in PROMPTS))
            assert (await c.get("/health")).status_code == 200
            metrics = (await c.get("/metrics")).text
            assert 'moetandem_memory_bytes{stat="rss"}' in metrics  # what a soak watches for drift
            assert 'moetandem_expert_stats{stat="failed_swaps"}' in metrics
            after = gpu_bytes(device)
        assert changes >= 3 and failed_changes == 0, (changes, failed_changes)
        return results, base, after

    with ServerThread(app) as srv:
        results, base, after = asyncio.run(scenario(srv))
    assert all(r["status"] == 200 and r["done"] and r["error"] is None for r in results), results
    same = sum(r["text"] == want[p] for r, p in zip(results, prompts))
    # exact misses: the all-resident tokens. On the GPU the batch composition changes the reduction order of the
    # grouped kernels, which can flip a near-tie of a random model's logits now and then; on the CPU it must not.
    assert same == n if device == "cpu" else same >= 0.9 * n, f"{same}/{n} texts equal the all-resident run"
    assert eng.provider.stats.failed_swaps > 0  # the injected failures did happen, and were survived
    assert after <= base * 1.02 + (1 << 20), f"GPU memory {after} bytes after, {base} at the baseline"


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_full_queues_or_refuses_never_crashes(model_dir: Path, device: str) -> None:
    """More requests than batch slots (the KV cache rows) + queue: the excess waits or gets 429; a request that
    can never fit (its context, or n beyond slots + queue) gets 400; all the others complete."""
    s = SCALE[device]
    batch, n, tokens = s["batch"], s["streams"] * 2, s["tokens"]
    eng = load(model_dir, device, expert_budget=0.5, policy="auto")
    app = create_app(eng, model_id="tiny", api_key=KEY, max_batch=batch, max_waiting=n // 2, max_model_len=128)

    async def scenario(srv: ServerThread) -> tuple[list[dict[str, Any]], int, int]:
        async with client(srv) as c:
            await stream(c, PROMPTS[0], 4)
            base = gpu_bytes(device)
            tasks = [asyncio.create_task(stream(c, PROMPTS[i % 3], tokens)) for i in range(n)]
            too_long = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 500})
            assert too_long.status_code == 400 and "context" in too_long.text
            never = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "n": 2 * n})
            assert never.status_code == 400, never.text
            results = list(await asyncio.gather(*tasks))
            assert (await c.get("/health")).status_code == 200
            again = await asyncio.gather(*(stream(c, p, 4) for p in PROMPTS))
            assert all(r["done"] and r["error"] is None for r in again)
            return results, base, gpu_bytes(device)

    with ServerThread(app) as srv:
        t = time.monotonic()
        results, base, after = asyncio.run(scenario(srv))
    ok = [r for r in results if r["status"] == 200]
    assert all(r["done"] and r["error"] is None for r in ok), [r for r in ok if r["error"]]
    assert all(r["status"] == 429 for r in results if r["status"] != 200), results
    assert len(ok) >= batch + n // 2  # at least the slots and the queue were served
    assert after <= base * 1.02 + (1 << 20), f"GPU memory {after} bytes after, {base} at the baseline"
    assert time.monotonic() - t < 600
