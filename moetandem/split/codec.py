"""Activation codecs for the end–cloud link: what crosses where the model is cut.

ActivationCodec: a low-rank linear encoder d→r and decoder r→d (PCA of calibration activations, mean-centred,
components whitened so every code has unit variance; optionally fine-tuned by KL distillation, see
split/calibration.py), then int8 per-token absmax quantisation of the codes. A frame is
{"codes": int8 [T, r], "scale": float16 [T]}: r + 2 bytes per token.

With token side information (`side` [V, H], the mean activation of each token id at this cut, fitted on
calibration text) the codec sends the token id of every row as well ("tokens": int16 [T], int32 for vocabularies
over 32767) and codes only x - side[token]: the decoder adds side[token] back. At the early cuts most of the
residual stream's variance is explained by the current token, so this buys far more than a few extra ranks.
encode() then needs the rows' token ids (the end and the cloud both have them). IdentityCodec sends the activations as
float16 {"x": [T, H]} (codec off, naive split). Frames are plain tensors, never pickles; files are safetensors.

Bandwidth everywhere in moetandem.split is in **bytes** per second."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moetandem.errors import CalibrationError, InvalidRequestError

Frame = dict[str, torch.Tensor]


def _check(frame: Frame, key: str, dtype: torch.dtype, cols: int | None) -> torch.Tensor:
    t = frame.get(key) if isinstance(frame, dict) else None
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise InvalidRequestError(f"malformed codec frame: {key!r} must be a {dtype} tensor")
    if (cols is None and t.dim() != 1) or (cols is not None and (t.dim() != 2 or t.shape[1] != cols)):
        raise InvalidRequestError(f"malformed codec frame: {key!r} has shape {list(t.shape)}, expected "
                                  f"{'[T]' if cols is None else f'[T, {cols}]'}")
    return t


class ActivationCodec:
    """x [T, H] → codes int8 [T, r] + per-token scale float16 [T] → x̂ [T, H] (in `dtype`, the model's)."""

    kind = "lowrank"

    def __init__(self, mean: torch.Tensor, enc: torch.Tensor, dec: torch.Tensor, dtype: torch.dtype = torch.float32,
                 info: dict | None = None, side: torch.Tensor | None = None) -> None:
        if enc.dim() != 2 or dec.shape != (enc.shape[1], enc.shape[0]) or mean.shape != (enc.shape[0],):
            raise InvalidRequestError(f"codec shapes disagree: mean {list(mean.shape)}, enc {list(enc.shape)}, "
                                      f"dec {list(dec.shape)}")
        self.mean = mean.float()  # [H]
        self.enc = enc.float()  # [H, r]
        self.dec = dec.float()  # [r, H]
        self.dtype = dtype
        self.info: dict = dict(info or {})  # cut_layer, fine-tune steps, measured quality
        if side is not None and (side.dim() != 2 or side.shape[1] != enc.shape[0]):
            raise InvalidRequestError(f"codec side table must be [V, {enc.shape[0]}], got {list(side.shape)}")
        self.side = side.float() if side is not None else None  # [V, H]
        self.token_dtype = torch.int16 if side is None or side.shape[0] <= 32767 else torch.int32

    @property
    def rank(self) -> int:
        return self.enc.shape[1]

    @property
    def hidden(self) -> int:
        return self.enc.shape[0]

    @property
    def nbytes_per_token(self) -> int:
        side = 0 if self.side is None else torch.empty(0, dtype=self.token_dtype).element_size()
        return self.rank + 2 + side  # int8 codes + float16 scale (+ token id)

    def parameters(self) -> list[torch.Tensor]:
        return [self.mean, self.enc, self.dec]

    def _side(self, tokens: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if self.side is None:
            return None
        if tokens is None:
            raise InvalidRequestError("this codec uses token side information: pass the rows' token ids")
        t = tokens.reshape(-1).long()
        if t.shape[0] != rows or (rows and (int(t.min()) < 0 or int(t.max()) >= self.side.shape[0])):
            raise InvalidRequestError(f"malformed codec frame: need {rows} token ids in 0..{self.side.shape[0] - 1}")
        return self.side[t]  # [T, H]

    def project(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float() - self.mean
        side = self._side(token_ids, x.shape[0])
        return (x if side is None else x - side) @ self.enc  # [T, r]

    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Frame:
        """x [T, H] (token_ids [T] when the codec uses side information) → frame."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise InvalidRequestError(f"codec input must be [T, {self.hidden}], got {list(x.shape)}")
        c = self.project(x.to(self.mean.device), token_ids)  # [T, r]
        scale = (c.abs().amax(dim=1) / 127).clamp_min(1e-7).half()  # [T]
        codes = torch.round(c / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # [T, r]
        frame = {"codes": codes, "scale": scale}
        if self.side is not None and token_ids is not None:
            frame["tokens"] = token_ids.reshape(-1).to(self.token_dtype).cpu()
        return frame

    def decode(self, frame: Frame) -> torch.Tensor:
        codes = _check(frame, "codes", torch.int8, self.rank)
        scale = _check(frame, "scale", torch.float16, None)
        if scale.shape[0] != codes.shape[0]:
            raise InvalidRequestError(f"malformed codec frame: {codes.shape[0]} code rows but {scale.shape[0]} scales")
        tokens = _check(frame, "tokens", self.token_dtype, None) if self.side is not None else None
        c = codes.float() * scale.float()[:, None]  # [T, r]
        x = c @ self.dec + self.mean  # [T, H]
        side = self._side(tokens, codes.shape[0])
        return (x if side is None else x + side).to(self.dtype)

    def roundtrip(self, x: torch.Tensor, quantize: bool = True, token_ids: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """decode(encode(x)) in x's shape [..., H]; differentiable (straight-through rounding) for fine-tuning."""
        flat = x.reshape(-1, x.shape[-1])
        c = self.project(flat, token_ids)  # [T, r]
        if quantize:
            s = (c.detach().abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-7).half().float()  # [T, 1]
            c = c + (torch.round(c / s).clamp(-127, 127) * s - c).detach()
        y = c @ self.dec + self.mean
        side = self._side(token_ids, flat.shape[0])
        return (y if side is None else y + side).to(x.dtype).reshape(x.shape)

    def tensors(self, prefix: str = "", side_key: str | None = None) -> dict[str, torch.Tensor]:
        """The codec's tensors by name; the side table (float16) under side_key (default prefix + "side")."""
        t = {f"{prefix}mean": self.mean.contiguous(), f"{prefix}enc": self.enc.contiguous(),
             f"{prefix}dec": self.dec.contiguous()}
        if self.side is not None:
            t[side_key or f"{prefix}side"] = self.side.half().contiguous()
        return t

    def save(self, path: str | Path, fingerprint: str = "") -> None:
        save_file(self.tensors(), str(path), metadata={"kind": self.kind, "fingerprint": fingerprint,
                                                       "info": json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None, dtype: torch.dtype = torch.float32
             ) -> "ActivationCodec":
        """A codec saved by save(); with a fingerprint, refuse one calibrated for another checkpoint."""
        t, meta = _read(path, fingerprint)
        if meta.get("kind") != cls.kind:
            raise CalibrationError(f"{path} holds a {meta.get('kind')!r} codec, not a {cls.kind!r} one")
        return cls(t["mean"], t["enc"], t["dec"], dtype, json.loads(meta.get("info") or "{}"), t.get("side"))


class IdentityCodec:
    """No compression: the activations as float16 {"x": [T, H]} (2·H bytes per token)."""

    kind = "identity"

    def __init__(self, hidden: int, dtype: torch.dtype = torch.float32) -> None:
        self.hidden, self.dtype, self.info = hidden, dtype, {}

    @property
    def rank(self) -> int:
        return self.hidden

    @property
    def nbytes_per_token(self) -> int:
        return 2 * self.hidden

    def encode(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Frame:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise InvalidRequestError(f"codec input must be [T, {self.hidden}], got {list(x.shape)}")
        return {"x": x.detach().to(torch.float16).contiguous()}

    def decode(self, frame: Frame) -> torch.Tensor:
        return _check(frame, "x", torch.float16, self.hidden).to(self.dtype)

    def roundtrip(self, x: torch.Tensor, quantize: bool = True, token_ids: torch.Tensor | None = None
                  ) -> torch.Tensor:
        return x.to(torch.float16).to(x.dtype)

    def save(self, path: str | Path, fingerprint: str = "") -> None:
        save_file({"hidden": torch.tensor([self.hidden])}, str(path),
                  metadata={"kind": self.kind, "fingerprint": fingerprint})

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None, dtype: torch.dtype = torch.float32
             ) -> "IdentityCodec":
        t, meta = _read(path, fingerprint)
        if meta.get("kind") != cls.kind:
            raise CalibrationError(f"{path} holds a {meta.get('kind')!r} codec, not an identity one")
        return cls(int(t["hidden"][0]), dtype)


def _read(path: str | Path, fingerprint: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"codec file not found: {p}; run `moetandem calibrate --codec`")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type on a bad header
        raise CalibrationError(f"cannot read codec file {p} ({e}); run `moetandem calibrate --codec` again") from None
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CalibrationError(f"codec file {p} was calibrated for checkpoint {meta.get('fingerprint') or '?'}, not "
                               f"this one ({fingerprint}); run `moetandem calibrate --codec` for this checkpoint")
    return tensors, meta


def side_table(x: torch.Tensor, tokens: torch.Tensor, vocab_size: int, shrink: float = 4.0) -> torch.Tensor:
    """Per-token mean of activations x [N, H] over their token ids [N], shrunk towards the overall mean by
    `shrink` pseudo-rows (rare and unseen tokens get the overall mean): [V, H]."""
    x = x.float()
    t = tokens.reshape(-1).long()
    count = torch.zeros(vocab_size).index_add_(0, t, torch.ones(t.shape[0]))  # [V]
    total = torch.zeros(vocab_size, x.shape[1]).index_add_(0, t, x)  # [V, H]
    return (total + shrink * x.mean(dim=0)) / (count[:, None] + shrink)


def fit_pca(x: torch.Tensor, rank: int, dtype: torch.dtype = torch.float32, whiten: bool = True,
            channel_weight: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
            vocab_size: int | None = None, shrink: float = 4.0) -> ActivationCodec:
    """PCA codec of activations x [N, H]: the top-`rank` principal directions of the mean-centred rows.
    whiten: scale each code to unit variance (int8 per-token absmax then spends its levels evenly).
    channel_weight [H]: do the PCA on x·diag(w) (e.g. per-channel scaling of outlier dims), undone by the decoder.
    tokens [N] + vocab_size: token side information (side_table), the PCA then codes x - side[token]."""
    N, H = x.shape
    if not 1 <= rank <= H:
        raise InvalidRequestError(f"codec rank must be in 1..{H}, got {rank}")
    if N < 2:
        raise InvalidRequestError(f"need at least 2 calibration rows to fit a codec, got {N}")
    x = x.float()
    side = None
    if tokens is not None:
        side = side_table(x, tokens, vocab_size or int(tokens.max()) + 1, shrink)  # [V, H]
        x = x - side[tokens.reshape(-1).long()]
    mean = x.mean(dim=0)  # [H]
    w = channel_weight.float() if channel_weight is not None else torch.ones(H)
    _, S, Vh = torch.linalg.svd((x - mean) * w, full_matrices=False)  # Vh [min(N,H), H]
    V = Vh[:rank].T  # [H, r]
    sd = (S[:rank] / math.sqrt(N)).clamp_min(1e-6) if whiten else torch.ones(rank)  # [r]
    enc = (w[:, None] * V) / sd  # [H, r]
    dec = (V * sd).T / w  # [r, H]
    return ActivationCodec(mean, enc, dec, dtype, {"rank": rank, "rows": N, "method": "pca",
                                                   "side": side is not None}, side)


def choose_rank(available: Sequence[int], bandwidth_bps: float, tokens_per_s: float | None = None,
                latency_budget_s: float | None = None, quality: dict[int, float] | None = None,
                max_ppl_increase: float = 0.01, prefer: str = "largest",
                bytes_per_rank: dict[int, int] | None = None) -> int:
    """A codec rank from `available` whose measured perplexity increase (quality: rank → fraction, 0.01 = 1%)
    is within max_ppl_increase and whose bytes fit the link (bandwidth in bytes/s): r + 2 bytes per token at
    tokens_per_s, or one token's bytes within latency_budget_s. prefer="largest" (best quality that fits) or
    "smallest" (least link load). Bytes per token are r + 2 (codes + scale), or bytes_per_rank[r] when given
    (e.g. r + 4 for a codec that also sends token ids). Ranks missing from `quality` count as not measured and are not chosen."""
    if prefer not in ("largest", "smallest"):
        raise InvalidRequestError(f"prefer must be 'largest' or 'smallest', got {prefer!r}")
    if bandwidth_bps <= 0:
        raise InvalidRequestError(f"bandwidth must be positive (bytes/s), got {bandwidth_bps}")
    quality = quality or {}
    good = sorted(r for r in set(available) if r in quality and quality[r] <= max_ppl_increase)
    if not good:
        measured = ", ".join(f"r{r}: {100 * quality[r]:+.2f}%" for r in sorted(quality)) or "none measured"
        raise InvalidRequestError(f"no codec rank is within the {100 * max_ppl_increase:.2f}% perplexity bound "
                                  f"({measured}); raise the bound, calibrate larger ranks, or send fp16")
    limit = math.inf
    if tokens_per_s is not None:
        limit = min(limit, bandwidth_bps / tokens_per_s)
    if latency_budget_s is not None:
        limit = min(limit, bandwidth_bps * latency_budget_s)
    nbytes = {r: (bytes_per_rank or {}).get(r, r + 2) for r in good}
    fits = [r for r in good if nbytes[r] <= limit]
    if not fits:
        raise InvalidRequestError(f"the link carries {limit:.0f} bytes per token but the smallest rank within the "
                                  f"quality bound (r{good[0]}) needs {nbytes[good[0]]}; lower the token rate or the "
                                  "quality bound")
    return fits[-1] if prefer == "largest" else fits[0]
