"""Hidden states at a cut, as frame tensors: raw in the sender's dtype (codec "off": bit-exact), float16
(codec "fp16", naive split) or low-rank int8 codes (codec "lowrank", split/codec.py). Both sides build the same
codec for a cut from their own copy of the checkpoint's calibration file."""
from __future__ import annotations

from typing import Any

import torch

from moetandem.errors import InvalidRequestError
from moetandem.split.transport.frame import FrameError

CODECS = ("off", "fp16", "lowrank")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def make_codec(kind: str, ckpt: Any, cut: int, rank: int | None, hidden: int, dtype: torch.dtype) -> Any:
    """The codec for hidden states entering layer `cut` (None = raw)."""
    if kind == "off":
        return None
    from moetandem.split.codec import IdentityCodec
    if kind == "fp16":
        return IdentityCodec(hidden, dtype)
    if kind == "lowrank":
        from moetandem.split.calibration import load_codec
        if rank is None:
            raise InvalidRequestError("codec 'lowrank' needs a rank (--codec-rank R or the split plan's codec_rank)")
        return load_codec(ckpt, cut, rank, dtype)
    raise InvalidRequestError(f"unknown codec {kind!r}; choose one of {', '.join(CODECS)}")


def uses_tokens(codec: Any) -> bool:
    """True for a codec with token side information: it needs the rows' token ids to encode and decode."""
    return getattr(codec, "side", None) is not None


def encode_rows(x: torch.Tensor, codec: Any, token_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """x [T, H] (token_ids [T]: the rows' tokens) -> frame tensors. A codec with side information carries the
    token ids in its frame ("c_tokens"); the other side reads them back with row_tokens()."""
    if codec is None:
        return {"x": x.contiguous()}
    frame = codec.encode(x, token_ids) if uses_tokens(codec) else codec.encode(x)
    return {f"c_{k}": torch.as_tensor(v) for k, v in frame.items()}


def row_tokens(tensors: dict[str, torch.Tensor], rows: int, vocab: int) -> torch.Tensor | None:
    """The rows' token ids [T] (long) sent with a frame ("c_tokens" of a side-info codec, or "tok"), if any."""
    t = tensors.get("c_tokens", tensors.get("tok"))
    if t is None:
        return None
    if t.dtype not in (torch.int16, torch.int32, torch.int64) or list(t.shape) != [rows]:
        raise FrameError(f"token ids must be an integer tensor of shape [{rows}]")
    if rows and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise FrameError(f"token ids outside the vocabulary 0..{vocab - 1}")
    return t.long()


def decode_rows(tensors: dict[str, torch.Tensor], codec: Any, rows: int, hidden: int, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """Frame tensors -> x [rows, H] in dtype on device; FrameError when they do not fit."""
    if codec is None:
        x = tensors.get("x")
        if x is None or x.dtype not in _FLOATS or list(x.shape) != [rows, hidden]:
            raise FrameError(f"hidden states must be a float tensor 'x' of shape [{rows}, {hidden}]")
    else:
        try:
            x = codec.decode({k[2:]: v for k, v in tensors.items() if k.startswith("c_")})
        except (InvalidRequestError, RuntimeError) as e:
            raise FrameError(f"codec frame rejected: {e}") from None
        if list(x.shape) != [rows, hidden]:
            raise FrameError(f"codec frame decodes to {list(x.shape)}, expected [{rows}, {hidden}]")
    x = x.to(device=device, dtype=dtype)
    if not bool(torch.isfinite(x).all()):
        raise FrameError("hidden states hold NaN or Inf")
    return x
