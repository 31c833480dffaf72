"""One split stream's state on the cloud (split/cloud.py serves the streams): its KV caches (Session streams) and
the handlers of its frames — alloc, free, layers, experts — which validate a frame, decode its hidden states,
hand the compute to the server (alone, or batched with other sessions' exchanges: split/cloud_batch.py) and
encode the reply. `run_layers` / `run_experts` compute one or several exchanges as one call."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from moetandem.errors import CalibrationError, InvalidRequestError, MoetandemError
from moetandem.split.cloud_batch import Job
from moetandem.split.cloud_cache import Lease
from moetandem.split.decode import decode_steps, generator_state_bytes, read_decode_frame
from moetandem.split.logits import check_topk, pack_topk
from moetandem.split.transport.frame import Frame, FrameError, meta_int, tensor
from moetandem.split.transport.server import RequestRefused
from moetandem.split.wire import CODECS, decode_rows, encode_rows, make_codec, row_tokens, uses_tokens

if TYPE_CHECKING:
    from moetandem.split.cloud import CloudServer

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 4096


@dataclass
class _Step:
    """One `layers` exchange, ready to run: x [B, L, H] at pos [B, L] into the session rows `rows` [B]."""

    lease: Lease
    x: torch.Tensor
    pos: torch.Tensor
    rows: torch.Tensor
    valid: torch.Tensor | None
    kv_len: int
    start: int
    end: int


@dataclass
class _Cache:
    lease: Lease  # rows of a (shared) KV cache
    start: int
    end: int
    codec_in: Any
    codec_out: Any
    head_topk: int = 0  # K > 0: `layers` frames may ask for the top-K logits (split/logits.py) instead of hidden states


class CloudSession:
    """One stream's state: its KV caches (Session) or nothing (Experts)."""

    def __init__(self, server: "CloudServer", kind: str) -> None:
        self.server, self.kind = server, kind
        self.hello = False
        self.caches: dict[int, _Cache] = {}
        self.closed = False  # the stream ended: nothing may stay leased
        self.key = server.mirror.new_key() if server.mirror is not None else 0

    def nbytes(self) -> int:
        return sum(c.lease.nbytes() for c in self.caches.values())

    def free(self, cid: int) -> None:
        c = self.caches.pop(cid, None)
        if c is not None:
            self.server.pools.release(c.lease)

    def free_all(self) -> None:
        """The stream ended (maybe while an alloc computes on its worker thread: that alloc frees its own)."""
        self.closed = True
        for cid in list(self.caches):
            self.free(cid)

    def handle(self, f: Frame) -> Frame:
        if f.kind == "hello":
            return self.on_hello(f)
        if not self.hello:
            raise FrameError(f"{f.kind!r} before hello")
        handler = {"Session": {"alloc": self.on_alloc, "free": self.on_free, "layers": self.on_layers,
                               "decode": self.on_decode},
                   "Experts": {"experts": self.on_experts}}[self.kind].get(f.kind)
        if handler is None:
            raise FrameError(f"{f.kind!r} frames do not belong on the {self.kind} stream")
        srv = self.server
        # batched kinds run on the batch runner, which takes the compute lock itself
        lock = nullcontext() if srv.runner is not None and f.kind in ("layers", "experts", "decode") \
            else srv.compute_lock
        with srv.in_compute() as ahead, torch.inference_mode(), lock:
            if srv.mirror is not None:  # expert parallel: the other ranks compute this frame too
                self.server.mirror.send(self.key, self.kind, f)
            reply = handler(f)
        if ahead:
            reply.meta["queue"] = ahead
        return reply

    def on_hello(self, f: Frame) -> Frame:
        srv = self.server
        if f.meta.get("fingerprint") != srv.fingerprint:
            raise FrameError(f"the end holds checkpoint {str(f.meta.get('fingerprint'))[:16]!r}, this cloud serves "
                             f"{srv.fingerprint!r}: point both at the same checkpoint")
        self.hello = True
        a = srv.engine.args
        meta = {"fingerprint": srv.fingerprint, "num_layers": a.num_layers, "hidden": a.hidden_size,
                "max_len": a.max_position_embeddings, "dtype": str(srv.engine.dtype).removeprefix("torch."),
                "replicas": srv.replicas, "queue": srv.queue_depth}
        if srv.mirror is None:  # `decode` frames (split/decode.py) are served; not with ranks that replay frames
            meta["decode"] = 1
            meta["decode_sample"] = generator_state_bytes()  # and sample in them (its generator state size)
        if f.meta.get("costs") and srv.mirror is None:  # the end's scheduler asks for the cloud's measured step
            meta.update(srv.step_costs().as_meta())  # costs (split.costs; not with ranks that must meet in step)
        return Frame("reply", meta=meta)

    def on_alloc(self, f: Frame) -> Frame:
        a, srv = self.server.engine.args, self.server
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        rows = meta_int(f, "rows", 1, MAX_ROWS)
        max_len = meta_int(f, "max_len", 1, a.max_position_embeddings)
        start = meta_int(f, "start", 0, a.num_layers)
        end = meta_int(f, "end", start, a.num_layers)
        kind, rank = f.meta.get("codec", "off"), f.meta.get("rank")
        kind_out, rank_out = f.meta.get("codec_out", kind), f.meta.get("rank_out", rank)  # per crossing
        for k, r in ((kind, rank), (kind_out, rank_out)):
            if k not in CODECS or not (r is None or (isinstance(r, int) and 0 < r <= a.hidden_size)):
                raise FrameError(f"bad codec {str(k)[:20]!r} / rank {str(r)[:20]}")
        head_topk = f.meta.get("head_topk", 0)
        if head_topk:
            try:
                check_topk(head_topk, a.vocab_size)
            except InvalidRequestError as e:
                raise FrameError(str(e)) from None
            if end != a.num_layers:
                raise FrameError(f"head_topk needs the cloud to run the last layer (end {end} < {a.num_layers})")
        self.free(cid)
        layer_bytes = 2 * rows * max_len * a.num_kv_heads * a.head_dim * srv.engine.dtype.itemsize
        need = self.nbytes() + (end - start) * layer_bytes
        if need > srv.max_session_bytes:
            raise RequestRefused(f"a KV cache of {need} bytes exceeds this cloud's per-session limit of "
                                 f"{srv.max_session_bytes} bytes (--max-session-bytes)")
        try:
            codecs = [make_codec(k, srv.engine.store.ckpt, cut, r, a.hidden_size, srv.engine.dtype)
                      for k, r, cut in ((kind, rank, start), (kind_out, rank_out, end))]
        except (CalibrationError, MoetandemError) as e:
            raise RequestRefused(f"codec unavailable on the cloud: {e}") from None
        lease = srv.pools.lease(start, end, max_len, rows, owner=self)
        self.caches[cid] = _Cache(lease, start, end, *codecs, head_topk)
        if self.closed:
            self.free(cid)
        return Frame("reply", meta={"cache": cid, "kv_bytes": lease.nbytes()})

    def on_free(self, f: Frame) -> Frame:
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        self.free(cid)
        return Frame("reply", meta={"cache": cid})

    def on_layers(self, f: Frame) -> Frame:
        srv = self.server
        eng = srv.engine
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        c = self.caches.get(cid)
        if c is None:
            raise FrameError(f"cache {cid} was never allocated on this session")
        pos = tensor(f, "pos", (torch.int64,), 2)
        rows = tensor(f, "rows", (torch.int64,), 1)
        B, L = pos.shape
        valid = f.tensors.get("valid")
        if valid is not None and (valid.dtype != torch.bool or valid.shape != pos.shape):
            raise FrameError("valid must be bool of the shape of pos")
        if not 0 < B <= c.lease.batch or rows.shape[0] != B or L == 0:
            raise FrameError(f"batch of {B} rows does not fit the cache's {c.lease.batch}")
        if int(rows.min()) < 0 or int(rows.max()) >= c.lease.batch or rows.unique().numel() != B:
            raise FrameError("rows must be distinct cache rows")
        kv_len = meta_int(f, "kv_len", 1, c.lease.max_len)
        if int(pos.min()) < 0 or int(pos.max()) >= kv_len:
            raise FrameError(f"positions must lie in [0, kv_len={kv_len})")
        T = B * L if valid is None else int(valid.sum())
        out, last = f.meta.get("out"), f.tensors.get("last")
        if out is not None and (out not in ("topk", "none") or not c.head_topk):
            raise FrameError(f"out {str(out)[:20]!r}: only 'topk' or 'none', on a cache allocated with head_topk")
        if last is not None and (out != "topk" or last.dtype != torch.int64 or list(last.shape) != [B]
                                 or int(last.min()) < 0 or int(last.max()) >= L):
            raise FrameError(f"last must be int64 [{B}] positions in 0..{L - 1}, with out 'topk'")
        if c.start == 0 and "ids" in f.tensors:  # token ids instead of hidden states: the cloud embeds
            tokens = row_tokens({"tok": f.tensors["ids"]}, T, eng.args.vocab_size)
            x_rows = eng.model.embed(tokens.to(eng.device))  # [T, H]
        else:
            x_rows = decode_rows(f.tensors, c.codec_in, T, eng.args.hidden_size, eng.dtype, eng.device)  # [T, H]
            tokens = row_tokens(f.tensors, T, eng.args.vocab_size)  # [T] or None (needed by side-info codecs)
        dev = eng.device
        pos, rows = pos.to(dev), rows.to(dev)
        valid = valid.to(dev) if valid is not None else None
        x = x_rows.view(B, L, -1) if valid is None else \
            torch.zeros(B, L, x_rows.shape[1], dtype=eng.dtype, device=dev).index_put_((valid,), x_rows)
        step = _Step(c.lease, x, pos, rows, valid, kv_len, c.start, c.end)
        y = self._compute(c, step, batch=L == 1 and valid is None)  # [B, L, H]
        if out == "none":  # fill-only: the K/V are written, nothing goes down
            return Frame("reply")
        if last is not None:
            y = y[torch.arange(B, device=dev), last.to(dev)][:, None]  # [B, 1, H]: the positions to sample from
        y_rows = y.reshape(-1, y.shape[-1]) if valid is None or last is not None else y[valid]  # [T|B, H]
        if out == "topk":  # the LM head here: the K largest logits of each row go down
            return Frame("reply", tensors=pack_topk(eng.model.head(y_rows[:, None])[:, 0], c.head_topk))
        if uses_tokens(c.codec_out) and tokens is None:
            raise FrameError("this codec needs the rows' token ids ('tok') with the hidden states")
        out = encode_rows(y_rows.cpu(), c.codec_out, tokens)
        out.pop("c_tokens", None)  # the end has its own token ids: not sent back
        return Frame("reply", tensors=out)

    def on_decode(self, f: Frame) -> Frame:
        """Up to k tokens per row (greedy, or sampled as the end would), each step through the `layers` compute path
        (split/decode.py)."""
        srv = self.server
        eng, L = srv.engine, srv.engine.args.num_layers
        cid = meta_int(f, "cache", 0, 2**31 - 1)
        c = self.caches.get(cid)
        if c is None:
            raise FrameError(f"cache {cid} was never allocated on this session")
        if srv.mirror is not None or c.start != 0 or c.end != L or not c.head_topk:
            raise FrameError("decode needs a cache of every layer allocated with head_topk, on a cloud without "
                             "expert parallelism")
        req = read_decode_frame(f, c.lease.batch, c.lease.max_len, eng.args.vocab_size)

        def layers(x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self._compute(c, _Step(c.lease, x, pos, rows, None, c.lease.max_len, 0, L), batch=True)
        return Frame("reply", tensors=decode_steps(eng.model, layers, req, eng.device, c.head_topk))

    def _compute(self, c: _Cache, step: _Step, batch: bool) -> torch.Tensor:
        """Run `step` over the cache's layers on the server: y [B, L, H]. batch: a decode step, which the server
        may batch with other sessions' steps on the same pool (prefills run alone)."""
        srv = self.server
        with srv.pools.hold(c.lease):
            return srv.compute(Job(c.lease.pool if batch else None, step.x.shape[0],
                                   partial(run_layers, srv.engine), step, srv.pools.peers(c.lease)))

    def on_experts(self, f: Frame) -> Frame:
        eng = self.server.engine
        layer = meta_int(f, "layer", 0, eng.args.num_layers - 1)
        if layer not in eng.store.layers:
            raise FrameError(f"layer {layer} has no experts")
        x = tensor(f, "x", _FLOATS, 2)
        ids = tensor(f, "ids", (torch.int64,), 2)
        w = tensor(f, "w", _FLOATS, 2)
        T, k = ids.shape
        if x.shape != (T, eng.args.hidden_size) or w.shape != (T, k) or not 0 < k <= eng.args.num_experts:
            raise FrameError(f"experts: x {list(x.shape)}, ids {list(ids.shape)}, w {list(w.shape)} do not fit")
        if T and (int(ids.min()) < 0 or int(ids.max()) >= eng.args.num_experts):
            raise FrameError("expert ids out of range")
        if not bool(torch.isfinite(x).all()) or not bool(torch.isfinite(w).all()):
            raise FrameError("experts: NaN or Inf in x or w")
        dev, dt = eng.device, eng.dtype
        if not T:
            return Frame("reply", tensors={"y": x.clone()})
        args = (layer, x.to(dev, dt), ids.to(dev), w.to(dev, dt))
        y = self.server.compute(Job(("experts", layer, k), T, partial(run_experts, eng), args))  # [T, H]
        return Frame("reply", tensors={"y": y.to(x.dtype).cpu()})


def run_layers(eng: Any, jobs: list[Job]) -> list[torch.Tensor]:
    """The `layers` exchanges `jobs` (one pool; several: decode steps) as one forward -> each y [B, L, H]."""
    steps = [j.payload for j in jobs]
    s0 = steps[0]
    pool = s0.lease.pool
    with pool.lock:  # the pool's cache neither grows nor changes rows under the forward
        if len(steps) == 1:
            x, pos, valid, rows, kv_len = s0.x, s0.pos, s0.valid, s0.lease.slots[s0.rows], s0.kv_len
        else:  # one token per row: rows of different lengths share the mask of their own positions
            x = torch.cat([s.x for s in steps])  # [ΣB, 1, H]
            pos = torch.cat([s.pos for s in steps])  # [ΣB, 1]
            rows = torch.cat([s.lease.slots[s.rows] for s in steps])  # [ΣB] rows of the pool
            valid, kv_len = None, max(s.kv_len for s in steps)
        assert pool.cache is not None
        y = eng.model.forward_layers(x, pos, pool.cache, kv_len, s0.start, s0.end, eng.experts, valid, rows)
    return list(y.split([s.x.shape[0] for s in steps]))  # [B, L, H] each


def run_experts(eng: Any, jobs: list[Job]) -> list[torch.Tensor]:
    """`experts` exchanges of one layer as one expert call -> each y [T, H]."""
    layer = jobs[0].payload[0]
    x, ids, w = (torch.cat([j.payload[i] for j in jobs]) for i in (1, 2, 3))  # [ΣT, H], [ΣT, k] x2
    y = eng.provider.compute(layer, x, ids, w)  # [ΣT, H]
    return list(y.split([j.rows for j in jobs]))
