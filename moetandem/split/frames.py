"""The end's requests on a Session stream (split/cloud_session.py answers them), built in one place so every
client of the cloud (the end, split/end.py; load generators such as bench/capacity.py) speaks the same protocol:

    alloc   meta {"cache", "rows", "max_len", "start", "end", "codec", "rank", "codec_out", "rank_out"
                  [, "head_topk"]}: a KV cache of layers [start, end) for `rows` sequences of `max_len` positions
    layers  meta {"cache", "kv_len" [, "out"]}, tensors "pos" [B, L], "rows" [B], what enters the cut (token ids
            "ids" [T] when the cloud embeds, else the encoded hidden states, split/wire.py) [, "valid", "last"]

`decode` frames (k tokens per exchange) are built by split/decode.py."""
from __future__ import annotations

import torch

from moetandem.split.transport.frame import Frame


def alloc_frame(cache_id: int, rows: int, max_len: int, start: int, end: int, codec: str = "off",
                rank: int | None = None, codec_out: str | None = None, rank_out: int | None = None,
                head_topk: int = 0) -> Frame:
    """Allocate cloud KV cache `cache_id` for layers [start, end); codec/rank per crossing (in, out: the way
    back defaults to the way up); head_topk K > 0: the cloud may answer `layers` frames with top-K logits."""
    meta = {"cache": cache_id, "rows": rows, "max_len": max_len, "start": start, "end": end, "codec": codec,
            "rank": rank, "codec_out": codec if codec_out is None else codec_out,
            "rank_out": rank if codec_out is None else rank_out, **({"head_topk": head_topk} if head_topk else {})}
    return Frame("alloc", meta=meta)


def layers_frame(cache_id: int, kv_len: int, pos: torch.Tensor, rows: torch.Tensor,
                 cut: dict[str, torch.Tensor], valid: torch.Tensor | None = None, last: torch.Tensor | None = None,
                 out: str | None = None) -> Frame:
    """One exchange over the cache's layers: positions pos [B, L] of cache rows [B] (CPU tensors); `cut` holds
    what enters the first layer ({"ids": token ids [T]} when the cache starts at layer 0, else encode_rows'
    tensors, with "tok" when the codec of the way back needs the token ids); valid [B, L]: the real positions of
    a padded batch; last [B] with out "topk": the position per row whose top-K logits come back; out "none":
    nothing comes back (fill-only)."""
    tensors = {"pos": pos, "rows": rows, **cut}
    if valid is not None:
        tensors["valid"] = valid
    if last is not None:
        tensors["last"] = last
    return Frame("layers", meta={"cache": cache_id, "kv_len": kv_len, **({"out": out} if out else {})},
                 tensors=tensors)
