"""The end side of split execution. `SplitModel` stands in for the engine's model (same call as
MoEForCausalLM.forward), so the batcher, `Engine.generate` and `moetandem serve` run unchanged on top:

    end: embed -> layers [0, a) ──frame──► cloud: layers [a, L-b) ──frame──► end: layers [L-b, L) -> norm -> head

With the cloud-only plan and the head in the cloud, a batcher step of plain sequences may instead be one `decode`
exchange in which the cloud makes up to k tokens per sequence (split/end_decode.py; the frame: split/decode.py).

Fallback: the end holds the whole checkpoint (experts stream through its committee / ExpertStore). When an
exchange fails, that forward runs locally; K/V of the cloud's layers missing on the end are rebuilt first by
re-prefilling the sequence so far (token ids are recorded per cache row; rows lagging as much in one batch).
When the cloud comes back, its K/V are filled in the background of serving: each step sends at most
`catch_up_tokens` of the lagging rows' history to the cloud (no tail layers run for them) and still runs on the
end, until every row is complete; then the steps move to the cloud: the way back never holds the batch for a whole
re-prefill. Per row we track how many positions each route has valid K/V for.
Re-planning: before each forward, when the link (bandwidth, RTT) or the cloud's reported load (queue depth over
its replicas) moved by 2x, `replanner(monitor)` may answer a new plan. While a plan keeps everything on the end,
a `hello` on the stateless Experts stream every `load_probe_s` keeps the cloud's load measured (so an idle cloud
brings the plan back); the Session stream then idles and the cloud frees its caches at its idle
timeout."""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch

from moetandem.errors import CloudError, InvalidRequestError, MoetandemError
from moetandem.graphs import PieceGraphs
from moetandem.models import KVCache
from moetandem.split.decode import RowSampler
from moetandem.split.end_decode import decode_exchange
from moetandem.split.experts import CloudExpertProvider
from moetandem.split.frames import alloc_frame, layers_frame
from moetandem.split.link import CloudLink
from moetandem.split.logits import check_topk, dense_logits, reply_kind
from moetandem.split.pipeline import micro_batches, run_pipelined
from moetandem.split.transport.frame import Frame, FrameError
from moetandem.split.wire import decode_rows, encode_rows, make_codec, uses_tokens

log = logging.getLogger("moetandem.split")


class _Rows:
    """Per local KV cache: token ids so far, and how many positions have valid K/V on each route."""

    def __init__(self, cache: KVCache) -> None:
        self.tokens = torch.zeros(cache.batch, cache.max_len, dtype=torch.long)  # [R, S]
        self.cloud_len = torch.zeros(cache.batch, dtype=torch.long)  # [R] cloud layers' K/V in the cloud
        self.local_len = torch.zeros(cache.batch, dtype=torch.long)  # [R] every layer's K/V on the end
        self.cloud_id: int | None = None
        self.cloud_key: tuple | None = None  # (epoch, start, end, codec/rank in, codec/rank out) of the cloud cache


class SplitModel:
    def __init__(self, model: Any, link: CloudLink, plan: Any, codec: str, ckpt: Any, local_provider: Any,
                 pieces: PieceGraphs | None = None, head_topk: int = 0, decode_tokens: int = 0) -> None:
        """pieces: CUDA graphs for the end's head and tail layers of decode steps (None: eager). head_topk K > 0:
        a plan without end tail layers has the cloud run the LM head and send the top-K logits (split/logits.py).
        decode_tokens k > 0: with the cloud-only plan and the head in the cloud, decode steps are k tokens per
        exchange (decode_exchange, split/decode.py)."""
        self.model, self.link, self.codec_kind, self.ckpt = model, link, codec, ckpt
        self.local_provider = local_provider
        self.pieces = pieces
        self.args = model.args
        self.head_topk = check_topk(head_topk, self.args.vocab_size) if head_topk else 0
        self.decode_tokens = decode_tokens
        self.stats = {"cloud_forwards": 0, "local_forwards": 0, "fallbacks": 0, "rebuilt_tokens": 0,
                      "replans": 0, "catch_up_steps": 0, "decode_exchanges": 0, "decode_tokens": 0}
        self.catch_up_tokens = 1024  # cloud K/V refilled per step after an outage (tokens over all lagging rows)
        self.replanner: Callable[[Any], Any] | None = None  # (LinkMonitor) -> new plan or None
        self.load_probe_s = 0.5  # while the plan uses no cloud: how often to ask the cloud for its load
        #: > 0: call the replanner once the link monitor holds this many samples, changed or not (--split-plan
        #: auto: the first plan, made when the link is measured); 0 after that
        self.plan_after_samples = 0
        self._probed = 0.0
        self._rows: weakref.WeakKeyDictionary[KVCache, _Rows] = weakref.WeakKeyDictionary()
        self._next_id = 0
        #: the provider of every end MoE layer: the experts a plan places in the cloud go there, the rest to
        #: local_provider (the engine's experts mapping points here; set_plan only changes what is remote)
        self.experts = CloudExpertProvider(local_provider, link, {}, self.args.num_experts)
        self.set_plan(plan)

    # ---- the model interface the engine and batcher use
    def moe_blocks(self) -> list[Any]:
        return self.model.moe_blocks()

    def expert_map(self) -> dict[int, Any]:
        """MoE layer -> provider, for the engine: every end layer through self.experts."""
        return {b.layer: self.experts for b in self.model.moe_blocks()}

    def __getattr__(self, name: str) -> Any:  # embed, head, rope tables, ...: the local model's
        return getattr(self.__dict__["model"], name)

    def set_plan(self, plan: Any) -> None:
        L = self.args.num_layers
        a, b = int(plan.end_layers_head), int(plan.end_layers_tail)
        if a < 0 or b < 0 or a + b > L:
            raise InvalidRequestError(f"split plan keeps {a} head + {b} tail layers on the end, but the model has {L}")
        self.plan, self.start, self.end = plan, a, L - b
        self.head_k = self.head_topk if self.start < self.end == L else 0  # the cloud runs the LM head
        # k tokens per exchange: only cloud-only with the head in the cloud; a SplitPlan's own decode_tokens
        # (split.plan: 0 = one exchange per token) bounds it, a Placement has none
        k, planned = self.decode_tokens if self.head_k and self.start == 0 else 0, getattr(plan, "decode_tokens", None)
        self.decode_k = k if planned is None else min(k, int(planned))
        self.micro = max(1, int(getattr(plan, "micro_batches", 1) or 1))
        self.rank = getattr(plan, "codec_rank", None)
        H, dt = self.args.hidden_size, self.model.lm_head.weight.dtype
        # codec "plan": per crossing, low-rank at the plan's rank (codec_rank up, codec_rank_down down), float16
        # where it has none (split.plan's convention); any other codec: that codec both ways
        if self.codec_kind == "plan":
            self.rank_out = getattr(plan, "codec_rank_down", None)
            self.kind, self.kind_out = ("lowrank" if r else "fp16" for r in (self.rank, self.rank_out))
        else:
            self.kind = self.kind_out = self.codec_kind
            self.rank_out = self.rank
        self.codec_in = make_codec(self.kind, self.ckpt, self.start, self.rank, H, dt)
        self.codec_out = make_codec(self.kind_out, self.ckpt, self.end, self.rank_out, H, dt)
        remote = {int(l): [int(i) for i in e] for l, e in (getattr(plan, "cloud_experts", None) or {}).items()
                  if e and not self.start <= int(l) < self.end}
        if any(not 0 <= i < self.args.num_experts for e in remote.values() for i in e):
            raise InvalidRequestError(f"the split plan places expert ids outside 0..{self.args.num_experts - 1}")
        self.experts.set_remote(remote)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
                 experts: Mapping[int, Any], valid: torch.Tensor | None = None, last_only: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> torch.Tensor:
        B = input_ids.shape[0]
        rows = torch.arange(B, device=pos.device) if rows is None else rows
        st = self._rows.get(cache) or self._rows.setdefault(cache, _Rows(cache))
        self._maybe_replan()
        r, first = rows.cpu(), pos[:, 0].cpu()  # [B]
        last = (pos if valid is None else pos.masked_fill(~valid, -1)).max(1).values.cpu()  # [B]
        keep = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid
        st.tokens[r[:, None].expand_as(pos)[keep.cpu()], pos.cpu()[keep.cpu()]] = input_ids.cpu()[keep.cpu()]
        if self.start < self.end and self.link.session() is not None:
            try:
                if self._rebuild(st, cache, r, first, experts, cloud=True, budget=self.catch_up_tokens):
                    logits = self._cloud_forward(st, input_ids, pos, cache, kv_len, valid, last_only, rows, experts)
                    st.cloud_len[r], st.local_len[r] = last + 1, torch.minimum(st.local_len[r], first)
                    self.stats["cloud_forwards"] += 1
                    return logits
                self.stats["catch_up_steps"] += 1  # the cloud's K/V are still being refilled: this step on the end
            except CloudError as e:
                self.stats["fallbacks"] += 1
                self.link.lost(e)
        self._rebuild(st, cache, r, first, experts, cloud=False)
        logits = self.model(input_ids, pos, cache, kv_len, experts, valid, last_only, rows)
        st.local_len[r], st.cloud_len[r] = last + 1, torch.minimum(st.cloud_len[r], first)
        self.stats["local_forwards"] += 1
        return logits

    @torch.inference_mode()
    def decode_exchange(self, tokens: list[int], pos: list[int], rows: list[int], budget: list[int],
                        stops: list[frozenset[int]], cache: KVCache, sampling: list[RowSampler] | None = None
                        ) -> list[list[int]] | None:
        """A decode step as one `decode` exchange of up to k tokens per row, or None: split/end_decode.py."""
        return decode_exchange(self, tokens, pos, rows, budget, stops, cache, sampling)

    # ---- the cloud route
    def _cloud_forward(self, st: _Rows, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
                       valid: torch.Tensor | None, last_only: torch.Tensor | None, rows: torch.Tensor,
                       experts: Mapping[int, Any], fill_only: bool = False) -> torch.Tensor | None:
        """fill_only: only fill the cloud's K/V (wait for the replies, run no tail layers; returns None)."""
        session = self._ensure_cloud_cache(st, cache)
        m, L, H = self.model, self.args.num_layers, self.args.hidden_size
        graphed = self._graphed(ids, valid, last_only, experts)
        topk, down = reply_kind(self.head_k, fill_only, last_only is not None, ids.shape[1])
        gkey = (id(cache), kv_len, tuple(id(p) for p in experts.values()))  # what the captured pieces close over

        def head_layers(i: torch.Tensor, q: torch.Tensor, r: torch.Tensor, v: torch.Tensor | None = None
                        ) -> torch.Tensor:
            return m.forward_layers(m.embed(i), q, cache, kv_len, 0, self.start, experts, v, r)  # [b, L, H]

        def tail_layers(y: torch.Tensor, q: torch.Tensor, r: torch.Tensor, v: torch.Tensor | None = None,
                        last: torch.Tensor | None = None) -> torch.Tensor:
            return m.head(m.forward_layers(y, q, cache, kv_len, self.end, L, experts, v, r), last)  # [b, L|1, V]

        def head(p: slice) -> torch.Tensor | None:
            if self.start == 0:
                return None  # the cloud embeds
            if graphed:
                return self.pieces.run("head", gkey, head_layers, ids[p], pos[p], rows[p])
            return head_layers(ids[p], pos[p], rows[p], _at(valid, p))

        def send(p: slice, x: torch.Tensor | None) -> Any:
            v = _at(valid, p)
            tok = (ids[p].reshape(-1) if v is None else ids[p][v]).cpu()  # [T] the rows' token ids
            if x is None:  # the cloud embeds: token ids go up instead of hidden states
                cut = {"ids": tok}
            else:
                x_rows = x.reshape(-1, H) if v is None else x[v]  # [T, H]
                cut = encode_rows(x_rows.cpu(), self.codec_in, tok)
            if down is None and uses_tokens(self.codec_out) and "c_tokens" not in cut and "ids" not in cut:
                cut["tok"] = tok.to(torch.int32)  # the cloud's encoder needs them for the way back
            last = last_only[p].cpu() if topk and last_only is not None else None
            return session.submit(layers_frame(st.cloud_id, kv_len, pos[p].cpu(), rows[p].cpu(), cut,
                                               None if v is None else v.cpu(), last, down))

        def tail(p: slice, fut: Any) -> torch.Tensor:
            v = _at(valid, p)
            b, n = pos[p].shape
            T = b * n if v is None else int(v.sum())
            try:
                reply = session.wait(fut).tensors
                if fill_only:
                    return ids.new_zeros(0)
                if topk:
                    return dense_logits(reply, v, last_only is not None, b, topk, self.args.vocab_size,
                                        m.lm_head.weight.dtype, pos.device)  # [b, 1, V]
                if uses_tokens(self.codec_out):  # the decoder adds side[token]: the tokens must be ours
                    tok = (ids[p].reshape(-1) if v is None else ids[p][v]).cpu()
                    reply["c_tokens"] = tok.to(self.codec_out.token_dtype)
                y_rows = decode_rows(reply, self.codec_out, T, H, m.lm_head.weight.dtype, pos.device)  # [T, H]
            except FrameError as e:
                raise CloudError(f"bad reply from the cloud: {e}") from None
            y = y_rows.view(b, n, H) if v is None else torch.zeros(b, n, H, dtype=y_rows.dtype,
                                                                   device=y_rows.device).index_put_((v,), y_rows)
            if graphed:
                return self.pieces.run("tail", gkey, tail_layers, y, pos[p], rows[p])
            return tail_layers(y, pos[p], rows[p], v, None if last_only is None else last_only[p])

        out = run_pipelined(micro_batches(ids.shape[0], self.micro), head, send, tail)
        return None if fill_only else torch.cat(out)

    def _graphed(self, ids: torch.Tensor, valid: torch.Tensor | None, last_only: torch.Tensor | None,
                 experts: Mapping[int, Any]) -> bool:
        """Decode steps (one token per row, every row real) run the end's layers as CUDA graphs when every
        provider of them is graph-safe (no cloud-placed experts in the end's layers: those need the network)."""
        if self.pieces is None or ids.shape[1] != 1 or valid is not None or last_only is not None:
            return False
        return not self.pieces.capture or all(getattr(p, "graph_safe", False) for p in experts.values())

    def _ensure_cloud_cache(self, st: _Rows, cache: KVCache) -> Any:
        session = self.link.session()
        if session is None:
            raise CloudError("the cloud went away")
        key = (self.link.epoch, self.start, self.end, self.kind, self.rank, self.kind_out, self.rank_out, self.head_k)
        if st.cloud_key != key:
            self._next_id += 1
            session.request(alloc_frame(self._next_id, cache.batch, cache.max_len, self.start, self.end, self.kind,
                                        self.rank, self.kind_out, self.rank_out, self.head_k))
            st.cloud_id, st.cloud_key = self._next_id, key
            st.cloud_len.zero_()
        return session

    def _rebuild(self, st: _Rows, cache: KVCache, rows: torch.Tensor, first: torch.Tensor, experts: Mapping[int, Any],
                 cloud: bool, budget: int | None = None, max_batches: int = 4) -> bool:
        """Re-prefill positions [have, first) of each row whose K/V on this route stop short of `first`; rows with
        as many positions to do go in one batch (no padding: a padded position would overwrite valid K/V). With
        `budget`: at most about that many tokens (an equal share per row) in at most max_batches batches. True
        when every row is complete. On the cloud only the cloud's K/V are filled (no tail layers; the end's head
        layers recompute what they hold), so the end's own K/V stay valid."""
        have = st.cloud_len if cloud else st.local_len
        if cloud:
            self._ensure_cloud_cache(st, cache)
        lag = [(r, int(have[r]), f) for r, f in zip(rows.tolist(), first.tolist()) if int(have[r]) < f]
        share = None if budget is None else max(2, budget // max(1, len(lag)))
        groups: dict[int, list[tuple[int, int]]] = {}
        for r, h, f in lag:
            groups.setdefault(f - h if share is None else min(share, f - h), []).append((r, h))
        order = sorted(groups.items(), key=lambda g: -len(g[1]))  # the most rows first
        dev = self.model.lm_head.weight.device
        for n, spans in order if budget is None else order[:max_batches]:
            ids = torch.stack([st.tokens[r, h:h + n] for r, h in spans]).to(dev)  # [b, n]
            pos = torch.stack([torch.arange(h, h + n) for _, h in spans]).to(dev)  # [b, n]
            rr = torch.tensor([r for r, _ in spans], device=dev)
            kv_len, last = max(h for _, h in spans) + n, torch.full((len(spans),), n - 1, device=dev)
            if cloud:
                self._cloud_forward(st, ids, pos, cache, kv_len, None, last, rr, experts, fill_only=True)
            else:
                self.model(ids, pos, cache, kv_len, experts, None, last, rr)
            for r, h in spans:
                have[r] = h + n
                if not cloud:  # the end's head/tail K/V were rewritten on the local route: the cloud route's stop
                    st.cloud_len[r] = min(int(st.cloud_len[r]), h)
            self.stats["rebuilt_tokens"] += n * len(spans)
        return all(int(have[r]) >= f for r, _, f in lag)

    def _probe_load(self) -> None:
        """A plan without the cloud sends it nothing: ask for its load (hello, not awaited: its reply feeds the
        monitor) every load_probe_s, on the Experts stream, only while nothing else is in flight there."""
        now = time.monotonic()
        if self.start < self.end or self.experts.remote or now - self._probed < self.load_probe_s:
            return
        self._probed = now
        stream = self.link.experts() if self.replanner is not None else None
        if stream is not None and not stream.in_flight:
            stream.submit(Frame("hello", meta={"fingerprint": self.link.fingerprint}), sample=False)

    def _maybe_replan(self) -> None:
        mon = self.link.monitor
        self._probe_load()
        link_moved, load_moved = mon.changed(), mon.load_changed()
        first = 0 < self.plan_after_samples <= mon.samples
        if first:
            self.plan_after_samples = 0
        if not (first or link_moved or load_moved):
            return
        why = "link measured" if first else "link changed" if link_moved else "cloud load changed"
        log.info("split: %s (bandwidth %.3g B/s, RTT %.1f ms, cloud queue %.1f over %d replica(s))", why,
                 mon.bandwidth_bps, mon.rtt_s * 1e3, mon.cloud_queue_depth, mon.cloud_replicas)
        plan = self.replanner(mon) if self.replanner is not None else None
        if plan is None:
            return
        old = self.plan
        try:
            self.set_plan(plan)
        except MoetandemError as e:  # e.g. the new codec rank is not calibrated: keep serving with the old plan
            log.warning("split: cannot apply the new plan (%s); keeping the current one", e)
            self.set_plan(old)
            return
        self.stats["replans"] += 1
        log.info("split: re-planned: end keeps %d head + %d tail layers, %d micro-batches", self.start,
                 self.args.num_layers - self.end, self.micro)

    def split_stats(self) -> dict[str, float]:
        return {**self.stats, **self.link.monitor.as_dict(), "link_losses": self.link.losses,
                "breaker_open": int(self.link.breaker_open), "link_probes": self.link.probes,
                "expert_rows_cloud": self.experts.remote_rows, "expert_rows_fallback": self.experts.fallback_rows}


def _at(t: torch.Tensor | None, p: slice) -> torch.Tensor | None:
    return None if t is None else t[p]
