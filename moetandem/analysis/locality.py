"""The PC-MoE observations on one MoE layer's routing (ids [N, k], gate weights [N, k], tokens in text order):
temporal locality (reuse distance; hit rate of an optimal (Belady) and an LRU cache of every size), skewed expert
popularity, how often low-weight experts are picked, and co-activation of experts."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

LOW_WEIGHTS = (0.05, 0.1, 0.2)
REUSE_BINS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)  # histogram edges: [1], [2], [3, 4], ... (tokens)


def requests(ids: np.ndarray) -> np.ndarray:
    """The (token, expert) uses of a layer as one request sequence, token by token (router order within one)."""
    return np.ascontiguousarray(ids).reshape(-1).astype(np.int64)


def reuse_distances(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, int]:
    """For each (token, expert) use after the expert's first: tokens since the expert was last used in this layer.
    Returns (distances, first uses)."""
    used = np.zeros((ids.shape[0], num_experts), dtype=bool)
    used[np.arange(ids.shape[0])[:, None], ids] = True
    out, cold = [], 0
    for e in range(num_experts):
        t = np.flatnonzero(used[:, e])
        if t.size:
            cold += 1
            out.append(np.diff(t))
    return (np.concatenate(out) if out else np.zeros(0, dtype=np.int64)), cold


def _next_use(seq: np.ndarray, never: int) -> np.ndarray:
    """nxt[i] = index of the next request of seq[i]'s expert after i (`never` when none)."""
    nxt = np.full(seq.size, never, dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(seq.size - 1, -1, -1):
        e = int(seq[i])
        nxt[i] = last.get(e, never)
        last[e] = i
    return nxt


def opt_stack_distances(seq: np.ndarray) -> np.ndarray:
    """Stack distance of every request under Belady's optimal replacement (Mattson et al. 1970: OPT is a stack
    algorithm with priority = time of next use), so one pass gives the misses of every cache size: request i hits
    a cache of c slots iff distance[i] <= c. First uses get 0 (infinite)."""
    never = seq.size + 1
    nxt = _next_use(seq, never).tolist()
    stack: list[int] = []  # experts, highest priority (soonest next use) first below the top
    prio: dict[int, int] = {}  # expert -> index of its next use
    out = np.zeros(seq.size, dtype=np.int64)
    for i, e in enumerate(seq.tolist()):
        try:
            d = stack.index(e)  # 0-based depth
            out[i] = d + 1
        except ValueError:
            d = len(stack)
            stack.append(e)
        carry = stack[0] if d > 0 else None
        stack[0] = e
        for j in range(1, d):  # the one used later of (carry, stack[j]) moves down
            if prio[carry] < prio[stack[j]]:
                stack[j], carry = carry, stack[j]
        if d > 0:
            stack[d] = carry
        prio[e] = nxt[i]
    return out


def lru_stack_distances(seq: np.ndarray) -> np.ndarray:
    """Stack distance of every request under LRU (1 = the most recently used expert); first uses get 0."""
    stack: list[int] = []
    out = np.zeros(seq.size, dtype=np.int64)
    for i, e in enumerate(seq.tolist()):
        try:
            d = stack.index(e)
            out[i] = d + 1
            del stack[d]
        except ValueError:
            pass
        stack.insert(0, e)
    return out


def hit_curve(dist: np.ndarray, num_experts: int) -> list[float]:
    """Hit rate for cache sizes 1..E from stack distances, the cache starting full (warm) with the first experts
    the trace uses, as a committee's slots do: those first uses are hits, so a cache of E slots hits 1.0."""
    n = dist.size
    distinct = int((dist == 0).sum())
    counts = np.bincount(dist[dist > 0], minlength=num_experts + 1)[: num_experts + 1]
    hits = np.cumsum(counts)
    return [float((hits[c] + min(c, distinct)) / max(1, n)) for c in range(1, num_experts + 1)]


def belady_hits(seq: np.ndarray, slots: int) -> float:
    """Direct simulation of Belady's replacement with a warm cache (for checking the one-pass curve)."""
    never = seq.size + 1
    nxt = _next_use(seq, never)
    cache: dict[int, int] = {}
    hits = 0
    for i, e in enumerate(seq.tolist()):
        if e in cache:
            hits += 1
        elif len(cache) < slots:
            hits += 1  # warm start: the first `slots` distinct experts are resident from the beginning
        else:
            del cache[max(cache, key=lambda x: cache[x])]
        cache[e] = int(nxt[i])
    return hits / max(1, seq.size)


def popularity(ids: np.ndarray, num_experts: int) -> dict[str, Any]:
    counts = np.bincount(ids.reshape(-1), minlength=num_experts).astype(np.float64)
    total = max(1.0, counts.sum())
    share = np.sort(counts)[::-1] / total
    p = counts / total
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    asc = np.sort(counts)
    gini = float(1 + 1 / num_experts - 2 * (np.cumsum(asc).sum() / (num_experts * total))) if counts.sum() else 0.0
    return {"counts": counts.astype(int).tolist(),
            "top10_share": float(share[: max(1, math.ceil(0.10 * num_experts))].sum()),
            "top25_share": float(share[: max(1, math.ceil(0.25 * num_experts))].sum()),
            "gini": gini, "entropy": entropy, "entropy_uniform": math.log(num_experts),
            "entropy_ratio": entropy / math.log(num_experts) if num_experts > 1 else 1.0,
            "unused": int((counts == 0).sum())}


def coactivation(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[E, E]: fraction of tokens that route to both experts (diagonal: to the expert)."""
    onehot = np.zeros((ids.shape[0], num_experts), dtype=np.float64)
    onehot[np.arange(ids.shape[0])[:, None], ids] = 1.0
    return onehot.T @ onehot / max(1, ids.shape[0])


def top_pairs(co: np.ndarray, n: int = 5) -> list[dict[str, float]]:
    """Most frequent expert pairs, with lift = P(a, b) / (P(a) P(b)) (1 = independent)."""
    E = co.shape[0]
    a, b = np.triu_indices(E, 1)
    order = np.argsort(-co[a, b], kind="stable")[:n]
    diag = np.diag(co)
    return [{"a": int(a[i]), "b": int(b[i]), "freq": float(co[a[i], b[i]]),
             "lift": float(co[a[i], b[i]] / (diag[a[i]] * diag[b[i]])) if diag[a[i]] * diag[b[i]] > 0 else 0.0}
            for i in order if co[a[i], b[i]] > 0]


def layer_summary(ids: np.ndarray, weights: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Every observation for one layer (ids, weights [N, k])."""
    dist, cold = reuse_distances(ids, num_experts)
    edges = np.array((0,) + REUSE_BINS + (np.iinfo(np.int64).max,))
    hist = np.histogram(dist, bins=edges + 0.5)[0] if dist.size else np.zeros(len(edges) - 1, dtype=int)
    labels = [f"{lo + 1}" if hi == lo + 1 else f"{lo + 1}-{hi}" for lo, hi in zip(edges[:-2], edges[1:-1])]
    labels.append(f">{REUSE_BINS[-1]}")
    seq = requests(ids)
    co = coactivation(ids, num_experts)
    return {
        "reuse": {"median": float(np.median(dist)) if dist.size else None,
                  "mean": float(dist.mean()) if dist.size else None, "first_uses": cold,
                  "histogram": dict(zip(labels, hist.astype(int).tolist()))},
        "hit_rate_optimal": hit_curve(opt_stack_distances(seq), num_experts),
        "hit_rate_lru": hit_curve(lru_stack_distances(seq), num_experts),
        "popularity": popularity(ids, num_experts),
        "low_weight": {f"<{t}": float((weights < t).mean()) for t in LOW_WEIGHTS},
        "top_pairs": top_pairs(co),
        "coactivation": co,
    }


def overall(layers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Means over layers (the hit-rate curves point by point)."""
    s = list(layers.values())
    mean = lambda f: float(np.mean([f(x) for x in s]))
    reuse = [x["reuse"]["median"] for x in s if x["reuse"]["median"] is not None]
    return {
        "reuse_median": float(np.median(reuse)) if reuse else None,
        "reuse_mean": mean(lambda x: x["reuse"]["mean"] or 0.0),
        "hit_rate_optimal": np.mean([x["hit_rate_optimal"] for x in s], axis=0).tolist(),
        "hit_rate_lru": np.mean([x["hit_rate_lru"] for x in s], axis=0).tolist(),
        "top10_share": mean(lambda x: x["popularity"]["top10_share"]),
        "top25_share": mean(lambda x: x["popularity"]["top25_share"]),
        "gini": mean(lambda x: x["popularity"]["gini"]),
        "entropy_ratio": mean(lambda x: x["popularity"]["entropy_ratio"]),
        "low_weight": {k: mean(lambda x, k=k: x["low_weight"][k]) for k in s[0]["low_weight"]},
    }
