"""Decode attention, one new token per sequence: today's path (write the new K/V, gather the batch's cache rows
up to kv_len, causal mask, SDPA) against the flash-decoding kernel (write, then the kernel reads the cache rows
in place up to each sequence's length), per layer, for real attention shapes, batch sizes and cache lengths.

Each path runs `layers` layers' distinct caches in one CUDA graph (at least ~200 MB of K/V per replay, so the
caches are not served from L2), kv_len = the cache length as DecodeGraphs passes it, and every sequence at
position fill·N - 1. GB/s counts the K/V bytes a layer must read (the live positions of each sequence, once).

    python bench/decode_attention.py --out out/decode-attention [--compile] [--fill 0.5] [--sweep]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.fused_moe import PEAK_GBS, graph_us  # noqa: E402
from moetandem.kernels.decode_attention import (decode_attention_op, decode_attention_triton,  # noqa: E402
                                                launch_choices)
from moetandem.models.cache import write, write_read  # noqa: E402

#: attention shapes: query heads, KV heads, head dim (+ sinks and a sliding window where the family has them)
SHAPES = {"olmoe-1b-7b": dict(nH=16, nKV=16, D=128), "qwen3-30b-a3b": dict(nH=32, nKV=4, D=128),
          "gpt-oss-20b-sliding": dict(nH=64, nKV=8, D=64, sinks=True, window=128)}
L2_DEFEAT = 200e6


def make_layers(B: int, N: int, nH: int, nKV: int, D: int, layers: int, sinks: bool, seed: int = 0) -> list[dict]:
    """Per layer: K/V caches [B+1, N, nKV, D] bf16 (the last row is the engine's scratch row), the new token's
    q [B, nH, 1, D] and k/v [B, 1, nKV, D], sinks [nH]; the sequences sit in shuffled rows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(layers):
        rnd = (lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16))
        out.append(dict(cache=(rnd(B + 1, N, nKV, D), rnd(B + 1, N, nKV, D)), q=rnd(B, nH, 1, D),
                        k=rnd(B, 1, nKV, D), v=rnd(B, 1, nKV, D), sinks=rnd(nH) if sinks else None))
    return out


def sdpa_step(ls: list[dict], rows: torch.Tensor, pos: torch.Tensor, N: int, window: int | None,
              outs: list[torch.Tensor]) -> None:
    """Today's path, as Attention._attend and forward_layers run it (mask built once per step)."""
    kpos = torch.arange(N, device=pos.device)
    mask = kpos[None, None] <= pos[:, :, None]  # [B, 1, N]
    if window:
        mask &= kpos[None, None] > pos[:, :, None] - window
    mask = mask[:, None]  # [B, 1, 1, N]
    for i, l in enumerate(ls):
        keys, values = write_read(l["cache"], (l["k"], l["v"]), rows, pos, N)  # [B, N, nKV, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, nKV, N, D]
        q = l["q"]
        if l["sinks"] is None:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        else:  # as Attention._with_sinks
            B, nH = q.shape[:2]
            pad = keys.new_zeros(*keys.shape[:2], 1, keys.shape[-1])
            keys, values = torch.cat([keys, pad], 2), torch.cat([values, pad], 2)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = torch.cat([bias.expand(B, nH, 1, -1), l["sinks"][None, :, None, None].expand(B, nH, 1, 1)], -1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=True)
        outs[i] = o[:, :, 0]  # [B, nH, D]


def kernel_step(ls: list[dict], rows: torch.Tensor, pos: torch.Tensor, N: int, window: int | None,
                outs: list[torch.Tensor]) -> None:
    """The new path, as Attention.forward's decode_step runs it."""
    for i, l in enumerate(ls):
        write(l["cache"], (l["k"], l["v"]), rows, pos)
        lengths = (pos[:, 0] + 1).clamp(max=N)  # [B]
        q = l["q"]
        outs[i] = decode_attention_op(q[:, :, 0], *l["cache"], rows, lengths, q.shape[-1] ** -0.5, window or 0,
                                      l["sinks"])


def case(shape: dict, B: int, N: int, fill: float, budget: float, use_compile: bool, sweep: bool) -> dict:
    nH, nKV, D, window = shape["nH"], shape["nKV"], shape["D"], shape.get("window")
    length = max(1, round(fill * N))
    live = min(length, window or length)
    kv_bytes = B * live * nKV * D * 2 * 2  # per layer: the K and V a layer must read
    per_layer = (B + 1) * N * nKV * D * 2 * 2  # allocated
    layers = int(max(1, min(512, budget // per_layer, max(16, math.ceil(L2_DEFEAT / max(kv_bytes, 1))))))
    ls = make_layers(B, N, nH, nKV, D, layers, bool(shape.get("sinks")))
    rows = torch.randperm(B, device="cuda")  # [B]
    pos = torch.full((B, 1), length - 1, device="cuda")  # [B, 1]
    o_s: list[torch.Tensor] = [torch.empty(0)] * layers
    o_k: list[torch.Tensor] = [torch.empty(0)] * layers
    sdpa: Callable[..., None] = torch.compile(sdpa_step, dynamic=False) if use_compile else sdpa_step
    run_s = lambda: sdpa(ls, rows, pos, N, window, o_s)  # noqa: E731
    run_k = lambda: kernel_step(ls, rows, pos, N, window, o_k)  # noqa: E731
    run_s(), run_k()
    err = float((o_k[0].float() - o_s[0].float()).norm() / o_s[0].float().norm())
    ts, tk = graph_us(run_s, layers), graph_us(run_k, layers)
    row = dict(B=B, N=N, live=live, layers=layers, sdpa_us=ts, kernel_us=tk, speedup=ts / tk, kv_mb=kv_bytes / 1e6,
               kernel_gbs=kv_bytes / tk / 1e3, kernel_pct=kv_bytes / tk / 1e3 / PEAK_GBS * 100, rel_err=err,
               splits=launch_choices(B, nH, nKV, D, min(N, window or N), torch.device("cuda"))[3])
    if sweep:
        row["sweep"] = sweep_configs(ls, rows, pos, N, window, layers, row["splits"])
    torch.cuda.empty_cache()
    return row


def sweep_configs(ls: list[dict], rows: torch.Tensor, pos: torch.Tensor, N: int, window: int | None, layers: int,
                  auto: int) -> list[dict]:
    """The kernel alone under other launch choices (block_n, num_warps, splits; for one query head per KV head
    also the padded tensor-core dot), fastest first."""
    lengths = (pos[:, 0] + 1).clamp(max=N)
    q0, k0 = ls[0]["q"], ls[0]["cache"][0]
    dots = (None, True) if q0.shape[1] == k0.shape[2] else (None,)
    res = []
    for block_n, warps, dot in itertools.product((16, 32, 64, 128), (2, 4, 8), dots):
        for splits in sorted({max(1, auto // 2), auto, auto * 2, min(64, auto * 4)}):
            def fn(bn: int = block_n, w: int = warps, s: int = splits, d: bool | None = dot) -> None:
                for l in ls:
                    decode_attention_triton(l["q"][:, :, 0], *l["cache"], rows, lengths, None, window, l["sinks"],
                                            splits=s, block_n=bn, num_warps=w, use_dot=d)
            try:
                res.append(dict(block_n=block_n, num_warps=warps, splits=splits, dot=bool(dot), us=graph_us(fn, layers)))
            except Exception as e:  # a config that does not compile (e.g. shared memory): skip it
                print(f"  skip block_n={block_n} warps={warps} splits={splits} dot={dot}: {type(e).__name__}")
    return sorted(res, key=lambda r: r["us"])[:5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"], choices=sorted(SHAPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 4096, 32768])
    ap.add_argument("--fill", type=float, default=1.0, help="live fraction of the cache (kv_len stays the cache length)")
    ap.add_argument("--budget-gb", type=float, default=24.0, help="K/V bytes allocated per case, at most")
    ap.add_argument("--compile", action="store_true", help="run the SDPA path through torch.compile (as deployed)")
    ap.add_argument("--sweep", action="store_true", help="also time other block sizes / warps / splits")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16  fill {a.fill}"
          f"{'  SDPA path compiled' if a.compile else ''}")
    print(f"{'shape':22} {'B':>3} {'N':>6} {'layers':>6} {'sdpa µs':>9} {'kernel µs':>9} {'×':>6} {'KV MB':>8} "
          f"{'GB/s':>7} {'%peak':>6} {'splits':>6} {'rel err':>8}")
    results = []
    for name in a.shapes:
        for B in a.batch:
            for N in a.lengths:
                try:
                    r = case(SHAPES[name], B, N, a.fill, a.budget_gb * 1e9, a.compile, a.sweep)
                except torch.OutOfMemoryError:
                    print(f"{name:22} {B:>3} {N:>6}  out of memory: lower --budget-gb")
                    torch.cuda.empty_cache()
                    continue
                results.append(dict(shape=name, **r))
                print(f"{name:22} {B:>3} {N:>6} {r['layers']:>6} {r['sdpa_us']:>9.1f} {r['kernel_us']:>9.1f} "
                      f"{r['speedup']:>6.2f} {r['kv_mb']:>8.1f} {r['kernel_gbs']:>7.0f} {r['kernel_pct']:>6.1f} "
                      f"{r['splits']:>6} {r['rel_err']:>8.1e}")
                for s in r.get("sweep", []):
                    print(f"{'':22}   sweep: block_n {s['block_n']:>3} warps {s['num_warps']} splits "
                          f"{s['splits']:>2}{' dot' if s['dot'] else ''}: {s['us']:.1f} µs")
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "decode_attention.json").write_text(json.dumps(
            dict(gpu=torch.cuda.get_device_name(), fill=a.fill, compile=a.compile, results=results), indent=1))


if __name__ == "__main__":
    main()
