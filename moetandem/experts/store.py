"""ExpertStore: where each expert's bytes live. Reads one (layer, expert) at a time from the mmap'd
safetensors files: the hub's per-expert layout, transformers' fused [E, ...] layout, or gpt-oss's (gate/up
interleaved in [E, H, 2I], biases; MXFP4 blocks + scales), plain or pre-quantized (moetandem.quantization:
block FP8, compressed-tensors int4). `read` dequantizes: every reader sees gate [I, H], up [I, H], down [H, I] in
nn.Linear layout, and biases for families that have them; a plain (non-gated) expert reads as its input projection
[I, H] and down [H, I]. `read_raw` gives a pre-quantized expert as stored (`native_format`), for the expert
formats that keep it packed. `layer_keys`: what a family's ArchArgs substitutes for {l} in its expert names
(Switch Transformers: "encoder.block.3.layer.1"), by MoE layer; default the layer number."""
from __future__ import annotations

import torch

from moetandem.checkpoint import Checkpoint
from moetandem.errors import CheckpointError
from moetandem.models.family import Family
from moetandem.models.transformer import ArchArgs
from moetandem.quantization import dense, scheme


#: E2M1 code -> value (MXFP4 elements; low nibble first), as transformers' integrations/mxfp4.py
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [..., G, 16] uint8 (two E2M1 codes a byte, low nibble first), scales [..., G] uint8 (E8M0, bias 127)
    -> [..., G*32] fp32: each group of 32 values times 2^(scale - 127)."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()  # [..., G, 32]
    vals = torch.ldexp(lut[codes], (scales.to(torch.int32) - 127)[..., None])  # [..., G, 32]
    return vals.flatten(-2)


class ExpertStore:
    def __init__(self, ckpt: Checkpoint, family: Family, args: ArchArgs) -> None:
        self.ckpt, self.family = ckpt, family
        self.num_experts, self.hidden, self.inter = args.num_experts, args.hidden_size, args.moe_intermediate_size
        #: the experts' activation; with `.bias`, read_flat appends [b_gate | b_up | b_down]
        self.activation = args.expert_activation
        self.layers = [i for i, moe in enumerate(args.moe_layers) if moe]
        self.layer_keys: list[str] = list(getattr(args, "layer_keys", None) or map(str, range(len(args.moe_layers))))
        self.scheme = scheme(ckpt.config, ckpt.path)
        #: the checkpoint's own expert format when pre-quantized ("mxfp4" | "fp8" | "int4"), and its group along K
        self.native_format = self.scheme.method if self.scheme else None
        self.native_group = None if self.scheme is None else (
            self.scheme.block[1] if self.scheme.block else self.scheme.group)
        suffix = "_packed" if self.native_format == "int4" else ""
        self._keys = tuple(k + suffix for k in family.expert_keys) if family.expert_layout == "linear" else \
            family.expert_keys
        self._layout: dict[int, str] = {}  # layer -> "per_expert" | "fused" | "gpt_oss" | "mxfp4"
        for layer in self.layers:
            self._layout[layer] = self._check_gpt_oss(layer) if family.expert_layout == "gpt_oss" else (
                "fused" if self._check_layer(layer) else "per_expert")
        if self.native_format == "mxfp4" and set(self._layout.values()) != {"mxfp4"}:
            self.native_format = None  # a gpt-oss checkpoint saved dequantized

    def _check_gpt_oss(self, layer: int) -> str:
        I, H, E = self.inter, self.hidden, self.num_experts
        gu, gub, d, db, gu_blk, gu_sc, d_blk, d_sc = (k.format(l=layer) for k in self.family.expert_keys)
        want = {gub: [E, 2 * I], db: [E, H]}
        if self.ckpt.has(gu) and self.ckpt.has(d):
            kind, want = "gpt_oss", {gu: [E, H, 2 * I], d: [E, I, H], **want}
        elif H % 32 or I % 32:
            raise CheckpointError(f"expert weights of layer {layer} are missing from the checkpoint (no {gu})")
        else:
            kind = "mxfp4"
            want = {gu_blk: [E, 2 * I, H // 32, 16], gu_sc: [E, 2 * I, H // 32], d_blk: [E, H, I // 32, 16],
                    d_sc: [E, H, I // 32], **want}
        for key, shape in want.items():
            if not self.ckpt.has(key):
                raise CheckpointError(f"expert weights of layer {layer} are missing from the checkpoint (no {key})")
            if self.ckpt.shape(key) != shape:
                raise CheckpointError(f"{key} has shape {self.ckpt.shape(key)}, config.json implies {shape}")
        return kind

    def _check_layer(self, layer: int) -> bool:
        I, H, E = self.inter, self.hidden, self.num_experts
        per_expert = [k.format(l=self.layer_keys[layer], e=e) for e in range(E) for k in self._keys]
        if all(self.ckpt.has(k) for k in per_expert):
            shapes = ([I, H], [I, H], [H, I]) if self.activation.gated else ([I, H], [H, I])
            if self.native_format == "int4":  # eight 4-bit values per int32
                shapes = tuple([n, -(-k // 8)] for n, k in shapes)
            for key, want in zip(per_expert[:len(shapes)], shapes):
                if self.ckpt.shape(key) != want:
                    raise CheckpointError(f"{key} has shape {self.ckpt.shape(key)}, config.json implies {want}")
            return False
        gate_up, down = self.family.fused_keys(layer) or ("", "")
        if gate_up and self.ckpt.has(gate_up) and self.ckpt.has(down) and self.scheme is not None:
            raise CheckpointError(f"fused {self.scheme.method} experts (layer {layer}) are not supported; use a "
                                  "checkpoint with per-expert weights or the bf16 release")
        if gate_up and self.ckpt.has(gate_up) and self.ckpt.has(down):
            if self.ckpt.shape(gate_up) != [E, 2 * I, H] or self.ckpt.shape(down) != [E, H, I]:
                raise CheckpointError(f"fused experts of layer {layer} have shapes {self.ckpt.shape(gate_up)}, "
                                      f"{self.ckpt.shape(down)}; config.json implies {[E, 2 * I, H]}, {[E, H, I]}")
            return True
        missing = next(k for k in per_expert if not self.ckpt.has(k))
        raise CheckpointError(f"expert weights of layer {layer} are missing from the checkpoint (no {missing})")

    def read(self, layer: int, expert: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
        """gate [I, H], up [I, H], down [H, I] of one expert (a plain expert: in [I, H], down [H, I]), on the CPU in
        the checkpoint's dtype. device: gpt-oss's stored tensors (transposed, or MXFP4) go there as stored and are
        transposed / dequantized there (a CPU transpose moves ~0.3 GB/s); other layouts are read on the CPU."""
        if not 0 <= expert < self.num_experts or layer not in self._layout:
            raise IndexError(f"no expert {expert} in MoE layer {layer}")
        layout = self._layout[layer]
        if layout == "gpt_oss":
            return self._gpt_oss_parts(layer, expert, device)
        if layout == "mxfp4":
            gu_blk, gu_sc, d_blk, d_sc = (k.format(l=layer) for k in self.family.expert_keys[4:])

            def get(key: str) -> torch.Tensor:
                t = self.ckpt.slice(key, expert)
                return t if device is None else t.to(device)
            w13 = dequantize_mxfp4(get(gu_blk), get(gu_sc))  # [2I, H], gate/up interleaved along 2I
            w2 = dequantize_mxfp4(get(d_blk), get(d_sc))  # [H, I]
            return w13[0::2], w13[1::2], w2
        if layout == "fused":
            gate_up, down = self.family.fused_keys(layer)
            gu = self.ckpt.slice(gate_up, expert)  # [2I, H]
            return gu[: self.inter], gu[self.inter:], self.ckpt.slice(down, expert)
        return tuple(dense(self.ckpt, self.scheme, k.format(l=self.layer_keys[layer], e=expert))
                     for k in self._keys[:len(self.family.expert_keys)])

    def read_raw(self, layer: int, expert: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A pre-quantized expert as stored, (data, scale) per matrix: mxfp4 [(gate_up blocks [2I, H/32, 16]
        (gate/up interleaved), scales [2I, H/32]), (down ...)]; fp8 / int4 [(gate data, scale), (up ...), (down ...)]
        with moetandem.quantization's on-disk layouts."""
        if self.native_format is None or layer not in self._layout:
            raise IndexError(f"no pre-quantized experts in layer {layer}")
        if self.native_format == "mxfp4":
            _, _, _, _, gu_blk, gu_sc, d_blk, d_sc = (k.format(l=layer) for k in self.family.expert_keys)
            return [(self.ckpt.slice(gu_blk, expert), self.ckpt.slice(gu_sc, expert)),
                    (self.ckpt.slice(d_blk, expert), self.ckpt.slice(d_sc, expert))]
        scale = "_scale_inv" if self.native_format == "fp8" else "_scale"
        out = []
        for k in self.family.expert_keys[:3]:
            name = k.format(l=layer, e=expert)
            data = self.ckpt.tensor(name + ("_packed" if self.native_format == "int4" else ""))
            out.append((data, self.ckpt.tensor(name + scale)))
        return out

    def read_bias(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """b_gate [I], b_up [I], b_down [H] of one expert (CPU, checkpoint dtype); None for families without."""
        if not self.activation.bias:
            return None
        if layer not in self._layout:
            raise IndexError(f"no MoE layer {layer}")
        _, gub, _, db = (k.format(l=layer) for k in self.family.expert_keys[:4])
        b13 = self.ckpt.slice(gub, expert)  # [2I], gate/up interleaved
        return b13[0::2], b13[1::2], self.ckpt.slice(db, expert)

    def expert_numel(self) -> int:
        """Elements of one flat expert: the matrices (three, or two for a plain expert), then the biases (if any)."""
        rows = self.activation.rows(self.inter)
        return (rows + self.inter) * self.hidden + self.activation.bias_numel(self.inter, self.hidden)

    def total_numel(self) -> int:
        return self.expert_numel() * self.num_experts * len(self.layers)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return self.expert_numel() * torch.empty((), dtype=dtype).element_size()

    def read_flat(self, layer: int, expert: int, dtype: torch.dtype, out: torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
        """One expert as a single flat buffer [gate | up | down (| b_gate | b_up | b_down)] (a swap is one copy);
        out: written there (e.g. a row of a pinned buffer or of a device tensor), each part in place, with no
        temporary when the checkpoint is in dtype. device (with out): where gpt-oss's stored tensors are
        transposed / dequantized (read's device) before they land in out."""
        bias = self.read_bias(layer, expert) or ()
        if out is None:
            return torch.cat([p.reshape(-1).to(dtype) for p in (*self.read(layer, expert), *bias)])
        parts = [*self.read(layer, expert, device), *bias]
        o = 0
        for p in parts:  # each part written in place: no temporary per part, no concatenation
            _copy(out[o:o + p.numel()].view(p.shape), p)
            o += p.numel()
        if o != out.numel():
            raise ValueError(f"read_flat: out holds {out.numel()} elements, the expert {o}")
        return out

    def _gpt_oss_parts(self, layer: int, expert: int, device: torch.device | str | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate [I, H], up [I, H], down [H, I] of a gpt-oss expert stored [H, 2I] (gate / up interleaved) and
        [I, H]: gate_up transposed once (contiguous [2I, H]), then every other row. Gathering the interleaved
        columns straight from the stored layout moved 0.17 GB/s on a 2-core host (0.5 on the H200's), which made
        pinning gpt-oss-20b's 36 GiB take 74 s; this is 3x faster on the CPU, and on a device faster still."""
        gu_key, _, d_key = (k.format(l=layer) for k in self.family.expert_keys[:3])
        gu, d = (self.ckpt.slice(k, expert) for k in (gu_key, d_key))  # [H, 2I], [I, H]
        if device is not None:
            gu, d = gu.to(device), d.to(device)
        t = _transposed(gu)  # [2I, H]
        return t[0::2], t[1::2], d.t()


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src); two-byte floats of one dtype as int16 (PyTorch's strided bf16 copy is ~1.5x slower)."""
    if dst.dtype == src.dtype and dst.element_size() == 2:
        dst.view(torch.int16).copy_(src.view(torch.int16))
    else:
        dst.copy_(src)


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """x.t() made contiguous (two-byte floats moved as int16, see _copy)."""
    if x.element_size() == 2:
        return x.view(torch.int16).t().contiguous().view(x.dtype)
    return x.t().contiguous()


def flat_views(buf: torch.Tensor, inter: int, hidden: int, gated: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of flat expert buffers [..., 3*I*H (+ biases)] as w13 [..., 2I, H] (gate; up) and w2 [..., H, I]; a
    plain expert's ([..., 2*I*H]) as its input projection [..., I, H] and w2 [..., H, I]."""
    rows = 2 * inter if gated else inter
    n = rows * hidden
    return (buf[..., :n].unflatten(-1, (rows, hidden)),
            buf[..., n:n + inter * hidden].unflatten(-1, (hidden, inter)))


def flat_bias_views(buf: torch.Tensor, inter: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The biases at the end of flat expert buffers [..., 3*I*H + 2I + H]: b13 [..., 2I] (gate; up), b2 [..., H]."""
    n = 3 * inter * hidden  # (gated experts: the only biased ones)
    if buf.shape[-1] != n + 2 * inter + hidden:
        raise ValueError(f"flat experts of {buf.shape[-1]} elements hold no biases for I={inter}, H={hidden}")
    return buf[..., n:n + 2 * inter], buf[..., n + 2 * inter:]


def return_freed_memory_to_os() -> None:
    """glibc's dynamic mmap threshold makes expert-sized temporaries (host reads, swap staging) come from heaps
    that are never trimmed, so a budgeted CPU run would keep tens of MiB above its budget. Fixing the threshold
    at 1 MiB makes every such buffer its own mapping, returned to the OS when freed. Process-wide; Linux only."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
