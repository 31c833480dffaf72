"""The cloud decodes k tokens per exchange (split option `cloud_decode_tokens` = k): with every layer and the LM head
in the cloud (cloud-only plan, `cloud_head_topk`), a greedy decode step need not cross the link per token. The end
sends one `decode` frame per batcher step; the cloud runs up to k single-token steps itself (embed -> layers
through the same compute path as `layers` frames, so cross-end batching applies -> norm + lm_head -> argmax),
feeds each token back, stops a row at one of its stop ids or its budget, and replies with the tokens. Its KV
cache rows then hold those positions, so the next exchange (or a `layers` frame) continues from there.

    decode frame  meta {"cache": id, "k": k}
                  tensors "rows" int64 [B] (cache rows), "tok" int64 [B] (each row's last token),
                          "pos" int64 [B] (that token's position), "budget" int64 [B] (tokens the row may still
                          make, >= 1), "stop" int64 [B, S] (stop ids, -1 = none)
    reply         tensors "out" int64 [B, k'] (the tokens made, -1 after a row's last), "n" int64 [B] (counts)

Greedy only: the argmax is the one the end would take from the cloud's top-K logits (split/logits.py puts it
first), so the tokens equal those of per-token exchanges. Plain tensors, never pickles."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from moetandem.config import MAX_DECODE_TOKENS
from moetandem.split.transport.frame import Frame, FrameError, meta_int, tensor


@dataclass
class DecodeRequest:
    """A validated `decode` frame (CPU tensors)."""

    rows: torch.Tensor  # [B] int64
    tok: torch.Tensor  # [B] int64
    pos: torch.Tensor  # [B] int64
    budget: torch.Tensor  # [B] int64
    stop: torch.Tensor  # [B, S] int64, -1 = none
    k: int


def decode_frame(cache_id: int, k: int, tokens: Sequence[int], pos: Sequence[int], rows: Sequence[int],
                 budget: Sequence[int], stops: Sequence[frozenset[int]]) -> Frame:
    """The end's `decode` frame for one batcher step (one entry per sequence)."""
    S = max((len(s) for s in stops), default=0)
    stop = torch.full((len(rows), S), -1, dtype=torch.int64)
    for i, s in enumerate(stops):
        stop[i, : len(s)] = torch.tensor(sorted(s), dtype=torch.int64)
    t = {"rows": rows, "tok": tokens, "pos": pos, "budget": budget}
    return Frame("decode", meta={"cache": cache_id, "k": k},
                 tensors={**{n: torch.tensor(list(v), dtype=torch.int64) for n, v in t.items()}, "stop": stop})


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
    return DecodeRequest(r, tok, pos, budget, stop, k)


def greedy_steps(model: Any, layers: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 req: DecodeRequest, device: torch.device) -> dict[str, torch.Tensor]:
    """Up to req.k greedy single-token steps of the rows still going; layers(x [b, 1, H], pos [b, 1], rows [b]) ->
    y [b, 1, H] runs every layer. Returns the reply's tensors {"out" [B, k'], "n" [B]}."""
    B, k = req.rows.shape[0], req.k
    out = torch.full((B, k), -1, dtype=torch.int64)
    n = torch.zeros(B, dtype=torch.int64)
    tok, pos = req.tok.clone(), req.pos.clone()
    live = torch.arange(B)
    for i in range(k):
        x = model.embed(tok[live].to(device))[:, None]  # [b, 1, H]
        y = layers(x, pos[live, None].to(device), req.rows[live].to(device))  # [b, 1, H]
        nxt = model.head(y)[:, 0].argmax(dim=-1).cpu()  # [b] as pack_topk's first entry
        out[live, i], n[live] = nxt, i + 1
        tok[live], pos[live] = nxt, pos[live] + 1
        done = (req.stop[live] == nxt[:, None]).any(1) | (n[live] >= req.budget[live])  # [b]
        live = live[~done]
        if not live.numel():
            break
    return {"out": out[:, : int(n.max())].contiguous(), "n": n}


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
