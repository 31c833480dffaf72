"""The cloud decodes k tokens per exchange (split option `cloud_decode_tokens` = k): with every layer and the LM head
in the cloud (cloud-only plan, `cloud_head_topk`), a decode step need not cross the link per token. The end sends
one `decode` frame per batcher step; the cloud runs up to k single-token steps itself (embed -> layers through the
same compute path as `layers` frames, so cross-end batching applies -> norm + lm_head -> the next token), feeds
each token back, stops a row at one of its stop ids or its budget, and replies with the tokens. Its KV cache rows
then hold those positions, so the next exchange (or a `layers` frame) continues from there.

    decode frame  meta {"cache": id, "k": k[, "dtype": the end's logits dtype, with sampling]}
                  tensors "rows" int64 [B] (cache rows), "tok" int64 [B] (each row's last token),
                          "pos" int64 [B] (that token's position), "budget" int64 [B] (tokens the row may still
                          make, >= 1), "stop" int64 [B, S] (stop ids, -1 = none)
                  sampling (clouds whose hello says `decode_sample`): "temp" float64 [B] (0 = greedy),
                          "top_p" float64 [B], and for the G rows with a generator "gen_at" int64 [G] (their
                          indices in the frame) and "gen" uint8 [G, N] (torch.Generator.get_state(), CPU)
    reply         tensors "out" int64 [B, k'] (the tokens made, -1 after a row's last), "n" int64 [B] (counts)
                          [, "gen" uint8 [G, N]: each generator's state after the row's last token]

The tokens are those of per-token exchanges. A greedy row takes the argmax, the entry the end would take first
from the cloud's top-K reply (split/logits.py). A sampled row does what the end's Batcher._emit does with that
reply: the same top-K (pack_topk), the same dense logits (unpack_topk, in the end's dtype, on the CPU) and the
same `sample` call with a CPU generator set to the row's state; the end sets the returned state back into its
generator, so its stream goes on where the cloud left it (next exchange, or per-token steps after a fallback).
A row without a generator (unseeded) samples with the cloud's RNG: the same distribution, not the same tokens.
Exact for seeded rows given the same torch build on both sides (the hello's `decode_sample` is the cloud's
generator state size; an end with another size keeps seeded rows per token). Plain tensors, never pickles."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moetandem.config import MAX_DECODE_TOKENS
from moetandem.sampling import sample
from moetandem.split.logits import pack_topk, unpack_topk
from moetandem.split.transport.frame import DTYPE_NAMES, DTYPES, Frame, FrameError, meta_int, tensor

#: the end's logits dtypes a decode frame may name (its lm_head's): the dense logits are rebuilt in it
SAMPLE_DTYPES = ("float32", "float16", "bfloat16")
#: a row's sampling on the end: (temperature, top_p, its generator or None: the global RNG)
RowSampler = tuple[float, float, torch.Generator | None]


def generator_state_bytes() -> int:
    """Bytes of a CPU torch.Generator's state on this torch build: a cloud's hello says it (`decode_sample`), an
    end ships generator states only to a cloud whose size matches its own."""
    return torch.Generator().get_state().numel()


@dataclass
class RowSampling:
    """How each row of a `decode` frame picks its tokens, as Batcher._emit on the end would."""

    temperature: list[float]  # [B], 0 = greedy
    top_p: list[float]  # [B]
    dtype: torch.dtype  # the end's logits dtype: the dense logits are rebuilt in it
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # frame row -> CPU generator, frame order


@dataclass
class DecodeRequest:
    """A validated `decode` frame (CPU tensors)."""

    rows: torch.Tensor  # [B] int64
    tok: torch.Tensor  # [B] int64
    pos: torch.Tensor  # [B] int64
    budget: torch.Tensor  # [B] int64
    stop: torch.Tensor  # [B, S] int64, -1 = none
    k: int
    sampling: RowSampling | None = None  # None: every row greedy (an end that does not sample in the cloud)


def decode_frame(cache_id: int, k: int, tokens: Sequence[int], pos: Sequence[int], rows: Sequence[int],
                 budget: Sequence[int], stops: Sequence[frozenset[int]], sampling: Sequence[RowSampler] | None = None,
                 logits_dtype: torch.dtype = torch.float32) -> Frame:
    """The end's `decode` frame for one batcher step (one entry per sequence); sampling: each row's (temperature,
    top_p, generator), whose states go up (None: every row greedy, no sampling tensors)."""
    S = max((len(s) for s in stops), default=0)
    stop = torch.full((len(rows), S), -1, dtype=torch.int64)
    for i, s in enumerate(stops):
        stop[i, : len(s)] = torch.tensor(sorted(s), dtype=torch.int64)
    t = {"rows": rows, "tok": tokens, "pos": pos, "budget": budget}
    tensors = {**{n: torch.tensor(list(v), dtype=torch.int64) for n, v in t.items()}, "stop": stop}
    meta: dict[str, Any] = {"cache": cache_id, "k": k}
    if sampling is not None:
        meta["dtype"] = DTYPE_NAMES[logits_dtype]
        tensors["temp"] = torch.tensor([float(t) for t, _, _ in sampling], dtype=torch.float64)
        tensors["top_p"] = torch.tensor([float(p) for _, p, _ in sampling], dtype=torch.float64)
        at = [i for i, (_, _, g) in enumerate(sampling) if g is not None]
        if at:
            tensors["gen_at"] = torch.tensor(at, dtype=torch.int64)
            tensors["gen"] = torch.stack([sampling[i][2].get_state() for i in at])  # type: ignore[union-attr]
    return Frame("decode", meta=meta, tensors=tensors)


def read_decode_frame(f: Frame, rows: int, max_len: int, vocab: int) -> DecodeRequest:
    """Validate a `decode` frame against the session cache (rows x max_len) and the vocabulary; FrameError."""
    k = meta_int(f, "k", 1, MAX_DECODE_TOKENS)
    r, tok, pos, budget = (tensor(f, n, (torch.int64,), 1) for n in ("rows", "tok", "pos", "budget"))
    stop = tensor(f, "stop", (torch.int64,), 2)
    B = r.shape[0]
    if not 0 < B <= rows or any(t.shape[0] != B for t in (tok, pos, budget, stop)):
        raise FrameError(f"decode: rows, tok, pos, budget and stop need one entry per row (1..{rows} rows)")
    if int(r.min()) < 0 or int(r.max()) >= rows or r.unique().numel() != B:
        raise FrameError("decode: rows must be distinct cache rows")
    if int(tok.min()) < 0 or int(tok.max()) >= vocab or (stop.numel() and (int(stop.min()) < -1
                                                                           or int(stop.max()) >= vocab)):
        raise FrameError(f"decode: token and stop ids must lie in 0..{vocab - 1} (stop: -1 = none)")
    if int(budget.min()) < 1 or int(pos.min()) < 0 or int((pos + budget.clamp(max=k)).max()) > max_len:
        raise FrameError(f"decode: budgets must be >= 1 and every fed position below max_len {max_len}")
    return DecodeRequest(r, tok, pos, budget, stop, k, read_sampling(f, B))


def read_sampling(f: Frame, B: int) -> RowSampling | None:
    """The sampling tensors of a `decode` frame of B rows (None when it has none: every row greedy); FrameError."""
    names = ("temp", "top_p", "gen_at", "gen")
    if not any(n in f.tensors for n in names):
        return None
    temp, top_p = (tensor(f, n, (torch.float64, torch.float32), 1) for n in names[:2])
    if temp.shape[0] != B or top_p.shape[0] != B:
        raise FrameError(f"decode: 'temp' and 'top_p' need one entry per row ({B})")
    if not bool(torch.isfinite(temp).all()) or bool((temp < 0).any()):
        raise FrameError("decode: temperatures must be finite and >= 0")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise FrameError("decode: top_p must lie in (0, 1]")
    name = f.meta.get("dtype")
    if name not in SAMPLE_DTYPES:
        raise FrameError(f"decode: meta 'dtype' (the end's logits dtype) must be one of {list(SAMPLE_DTYPES)}")
    out = RowSampling(temp.tolist(), top_p.tolist(), DTYPES[name])
    if "gen_at" not in f.tensors and "gen" not in f.tensors:
        return out
    at, state = tensor(f, "gen_at", (torch.int64,), 1), tensor(f, "gen", (torch.uint8,), 2)
    G, N = at.shape[0], generator_state_bytes()
    if G and (int(at.min()) < 0 or int(at.max()) >= B or at.unique().numel() != G):
        raise FrameError(f"decode: 'gen_at' must hold distinct row indices in 0..{B - 1}")
    if list(state.shape) != [G, N]:
        raise FrameError(f"decode: 'gen' must be uint8 [{G}, {N}] (a CPU generator's state per 'gen_at' row)")
    for i, s in zip(at.tolist(), state):
        g = torch.Generator()
        try:
            g.set_state(s.clone())  # its own storage: set_state on a row view (a storage offset) crashes
        except RuntimeError as e:
            raise FrameError(f"decode: row {i}'s generator state is not one: {str(e)[:80]}") from None
        out.generators[i] = g
    return out


def decode_steps(model: Any, layers: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 req: DecodeRequest, device: torch.device, head_k: int) -> dict[str, torch.Tensor]:
    """Up to req.k single-token steps of the rows still going; layers(x [b, 1, H], pos [b, 1], rows [b]) ->
    y [b, 1, H] runs every layer; head_k: the K of the top-K the end would receive per token. Returns the reply's
    tensors {"out" [B, k'], "n" [B][, "gen" [G, N]]}."""
    B, k = req.rows.shape[0], req.k
    out = torch.full((B, k), -1, dtype=torch.int64)
    n = torch.zeros(B, dtype=torch.int64)
    tok, pos = req.tok.clone(), req.pos.clone()
    live = torch.arange(B)
    for i in range(k):
        x = model.embed(tok[live].to(device))[:, None]  # [b, 1, H]
        y = layers(x, pos[live, None].to(device), req.rows[live].to(device))  # [b, 1, H]
        logits = model.head(y)[:, 0]  # [b, V]
        nxt = logits.argmax(dim=-1).cpu()  # [b] greedy: pack_topk's first entry
        if req.sampling is not None:
            nxt = _sampled(logits, nxt, live, req.sampling, head_k)
        out[live, i], n[live] = nxt, i + 1
        tok[live], pos[live] = nxt, pos[live] + 1
        done = (req.stop[live] == nxt[:, None]).any(1) | (n[live] >= req.budget[live])  # [b]
        live = live[~done]
        if not live.numel():
            break
    reply = {"out": out[:, : int(n.max())].contiguous(), "n": n}
    if req.sampling is not None and req.sampling.generators:
        reply["gen"] = torch.stack([g.get_state() for g in req.sampling.generators.values()])  # [G, N]
    return reply


def _sampled(logits: torch.Tensor, nxt: torch.Tensor, live: torch.Tensor, smp: RowSampling, head_k: int
             ) -> torch.Tensor:
    """nxt [b] with each sampled row's token drawn as Batcher._emit draws it on the end from this step's top-K
    reply: the dense logits the end rebuilds (its dtype, the CPU), sample() with the row's generator."""
    rows = live.tolist()
    js = [j for j, r in enumerate(rows) if smp.temperature[r] > 0]
    if not js:
        return nxt
    z = unpack_topk(pack_topk(logits[js], head_k), len(js), head_k, logits.shape[-1], smp.dtype,
                    torch.device("cpu"))  # [s, V] -inf outside each row's top-K
    nxt = nxt.clone()
    for q, j in enumerate(js):
        r = rows[j]
        try:
            nxt[j] = sample(z[q: q + 1], smp.temperature[r], smp.top_p[r], smp.generators.get(r))[0]
        except RuntimeError:  # as Batcher._emit: the row takes the argmax (z's first entry, nxt already)
            pass
    return nxt


def read_decode_reply(f: Frame, B: int, k: int, budget: Sequence[int], vocab: int) -> list[list[int]]:
    """The tokens per row of a `decode` reply (each 1..min(k, budget) long); FrameError when they do not fit."""
    out, n = f.tensors.get("out"), f.tensors.get("n")
    if out is None or n is None or out.dtype != torch.int64 or n.dtype != torch.int64 or out.dim() != 2 \
            or out.shape[0] != B or list(n.shape) != [B] or out.shape[1] > k:
        raise FrameError(f"a decode reply holds 'out' int64 [{B}, <= {k}] and 'n' int64 [{B}]")
    counts = n.tolist()
    if any(not 1 <= c <= min(k, b, out.shape[1]) for c, b in zip(counts, budget)):
        raise FrameError("a decode reply's counts must lie in 1..min(k, the row's budget)")
    toks = [row[:c] for row, c in zip(out.tolist(), counts)]
    if any(not 0 <= t < vocab for row in toks for t in row):
        raise FrameError(f"a decode reply holds token ids outside 0..{vocab - 1}")
    return toks


def read_reply_states(f: Frame, G: int) -> list[torch.Tensor]:
    """The G generator states of a `decode` reply (the frame's 'gen_at' order), each checked by loading it into a
    scratch CPU generator, so that a bad reply changes none of the end's generators; FrameError."""
    if not G:
        return []
    g, N = f.tensors.get("gen"), generator_state_bytes()
    if g is None or g.dtype != torch.uint8 or list(g.shape) != [G, N]:
        raise FrameError(f"a decode reply with sampling holds 'gen' uint8 [{G}, {N}]")
    states = [s.clone() for s in g]  # own storage each: set_state on a row view (a storage offset) crashes
    try:
        for s in states:
            torch.Generator().set_state(s)
    except RuntimeError as e:
        raise FrameError(f"a decode reply holds a generator state that is not one: {str(e)[:80]}") from None
    return states
