"""A pre-quantized checkpoint's experts in their own format, moved into moetandem.kernels.quant's layout without
ever being expanded: gpt-oss MXFP4 (blocks are already its rows; gate/up de-interleaved), block-wise FP8 (the
128×128 scales repeated along N into row-wise groups, exactly), compressed-tensors int4 (int32 words of eight
nibbles re-packed two a byte; the same nibble values, value + 8)."""
from __future__ import annotations

import torch

from moetandem.experts.store import ExpertStore
from moetandem.kernels.quant import _pack_nibbles
from moetandem.quantization import fp8_row_scales, int4_nibbles

Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # d13, s13, d2, s2


def native_parts(store: ExpertStore, layer: int, expert: int) -> Parts:
    """(w13 data, s13, w2 data, s2) of one expert in quant.py's layout for store.native_format."""
    fmt, I, H = store.native_format, store.inter, store.hidden
    raw = store.read_raw(layer, expert)
    if fmt == "mxfp4":
        (b13, s13), (b2, s2) = raw  # [2I, H/32, 16] gate/up interleaved, [2I, H/32]; [H, I/32, 16], [H, I/32]
        d13 = b13.reshape(2 * I, H // 2)
        return (torch.cat([d13[0::2], d13[1::2]]), torch.cat([s13[0::2], s13[1::2]]),
                b2.reshape(H, I // 2), s2)
    if fmt == "fp8":
        block = store.scheme.block
        (g, gs), (u, us), (d, ds) = raw  # fp8 [I, H] / [H, I], block scales
        d13 = torch.cat([g, u])  # [2I, H] float8_e4m3fn
        s13 = torch.cat([fp8_row_scales(gs, I, H, block), fp8_row_scales(us, I, H, block)])  # [2I, H/bk]
        return d13, s13, d, fp8_row_scales(ds, H, I, block)
    if fmt == "int4":
        (g, gs), (u, us), (d, ds) = raw  # int32 [I, H/8] / [H, I/8], scales [N, K/G]
        d13 = torch.cat([_pack_nibbles(int4_nibbles(g, H)), _pack_nibbles(int4_nibbles(u, H))])  # [2I, H/2]
        return d13, torch.cat([gs, us]).float(), _pack_nibbles(int4_nibbles(d, I)), ds.float()
    raise ValueError(f"no native expert format {fmt!r}")
