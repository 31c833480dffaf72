"""The LM head in the cloud (split option `cloud_head_topk` = K): when the cloud runs the model's last layer, it can
also run the final norm + lm_head and send down only the K largest logits of each position the end asks for,
instead of the hidden state there (K × 6 bytes per token, fp16 values + int32 ids, against 2 × hidden).

The end rebuilds dense logits [.., V] holding those K values and -inf elsewhere, so the engine's sampler runs
unchanged. Greedy decoding stays exact: the cloud puts the argmax of its full logits first (ties: the lowest id, as
argmax picks) and the end keeps that entry strictly above the rest after the fp16 rounding. Sampling draws from
the distribution truncated to the K best tokens and renormalised: exact for top-k sampling with k <= K, a truncated
distribution otherwise (temperature / top-p over the whole vocabulary; logprobs are those of the truncated one).
Frames are plain tensors ("top_v" float16 [T, K], "top_i" int32 [T, K]), never pickles."""
from __future__ import annotations

import torch

from moetandem.errors import InvalidRequestError
from moetandem.split.transport.frame import FrameError

VALUE_DTYPE, ID_DTYPE = torch.float16, torch.int32
_FP16_MAX = float(torch.finfo(torch.float16).max)


def topk_bytes(k: int) -> int:
    """Bytes per token of a top-K logits reply (values + ids), besides the frame's header."""
    return k * (VALUE_DTYPE.itemsize + ID_DTYPE.itemsize)


def check_topk(k: int, vocab: int) -> int:
    """K itself when 1 <= K <= vocab; InvalidRequestError saying what to pass otherwise."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise InvalidRequestError(f"--cloud-head-topk {k!r}: the cloud sends the K largest logits per token, so K "
                                  f"must be an integer in 1..{vocab} (the vocabulary); e.g. 64, or leave it out to "
                                  "run the LM head on the end")
    return k


def pack_topk(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """logits [T, V] -> {"top_v": float16 [T, K] (sorted, best first), "top_i": int32 [T, K]} on the CPU. The
    first entry of a row is its argmax (the lowest id among equal maxima), so greedy decoding on the end agrees."""
    v, i = logits.float().topk(k, dim=-1)  # [T, K] each
    first = logits.argmax(dim=-1)  # [T] what greedy decoding of the full row picks
    hit = i == first[:, None]  # [T, K]
    # where topk's order put another tied id first: swap the argmax into place (K-1 when > K ids tie at the max)
    at = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(first, k - 1))  # [T]
    rows = torch.arange(i.shape[0], device=i.device)
    i[rows, at] = i[:, 0].clone()
    i[:, 0] = first
    return {"top_v": v.clamp(-_FP16_MAX, _FP16_MAX).to(VALUE_DTYPE).cpu(), "top_i": i.to(ID_DTYPE).cpu()}


def unpack_topk(tensors: dict[str, torch.Tensor], rows: int, k: int, vocab: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A top-K reply -> dense logits [rows, V] in dtype on device: the K values at their ids, -inf elsewhere.
    FrameError when the tensors do not fit."""
    v, i = tensors.get("top_v"), tensors.get("top_i")
    if v is None or i is None or v.dtype not in (torch.float16, torch.float32) or i.dtype != ID_DTYPE \
            or list(v.shape) != [rows, k] or list(i.shape) != [rows, k]:
        raise FrameError(f"top-K logits must be 'top_v' float16 and 'top_i' int32 of shape [{rows}, {k}]")
    if rows and (int(i.min()) < 0 or int(i.max()) >= vocab):
        raise FrameError(f"top-K token ids outside the vocabulary 0..{vocab - 1}")
    if not bool(torch.isfinite(v).all()):
        raise FrameError("top-K logits hold NaN or Inf")
    v = v.to(device=device, dtype=dtype)
    if k > 1:  # the argmax stays strictly first after rounding (fp16 on the wire, the engine's dtype here)
        v[:, 0] = torch.maximum(v[:, 0], torch.nextafter(v[:, 1], torch.full_like(v[:, 1], float("inf"))))
    out = torch.full((rows, vocab), float("-inf"), dtype=dtype, device=device)
    return out.scatter_(1, i.to(device=device, dtype=torch.long), v)


def reply_kind(k: int, fill_only: bool, last_only: bool, n: int) -> tuple[int, str | None]:
    """What one `layers` frame asks the cloud to send down, when the cloud runs the head with top-K = k (k = 0: the
    option is off, or the end runs tail layers): (K of a top-K reply, 0 for none; the frame's "out" meta). Calls
    that sample (a decode step: n = 1; a prefill with last_only) get "topk"; fill-only frames (catch-up after an
    outage) get "none": no head, nothing down; a scoring call (every position's full logits) gets None: the hidden
    states, as without the option (so does every frame when k = 0: no "out" meta at all)."""
    if not k:
        return 0, None
    if fill_only:
        return 0, "none"
    return (k, "topk") if last_only or n == 1 else (0, None)


def dense_logits(tensors: dict[str, torch.Tensor], valid: torch.Tensor | None, last_only: bool, b: int, k: int,
                 vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The end's logits [b, 1, V] from a top-K reply to a frame of b rows: one row of the reply per sequence
    (last_only, or a decode step without padding), else one per valid position (padded rows get zeros)."""
    if last_only or valid is None:
        return unpack_topk(tensors, b, k, vocab, dtype, device).view(b, 1, vocab)
    z = unpack_topk(tensors, int(valid.sum()), k, vocab, dtype, device)  # [T, V]
    return z.new_zeros(b, 1, vocab).index_put_((valid.to(device),), z)
