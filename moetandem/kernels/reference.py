"""The fused MoE's argument checks and its plain-PyTorch reference (the path off CUDA, and the tests' oracle)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moetandem.kernels import quant

#: activation name -> the kernels' ACT code; act(g)·u, or gpt-oss's clamped SwiGLU (alpha, limit)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "clamped_swiglu": 3}  # gelu = erf form; gelu_tanh (Gemma)

Pair = tuple[torch.Tensor, torch.Tensor]


def check_args(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor, slot_table: torch.Tensor | None, activation: str,
               host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None, fmt: str = "bf16",
               scales: Pair | None = None, host_scales: Pair | None = None, host_fmt: str | None = None) -> None:
    """host_fmt: the host experts' format when it differs from the slots' (default fmt)."""
    if activation not in ACTIVATIONS:
        raise NotImplementedError(f"fused_moe: activation {activation!r} is not supported (have {list(ACTIVATIONS)})")
    quant.check_format(fmt)
    T, H = x.shape
    n, i2, hc = w13.shape
    I, cols = i2 // 2, quant.packed_cols
    if i2 % 2 or hc != cols(fmt, H) or w2.shape != (n, H, cols(fmt, I)) or fmt in quant.PACKED and (H | I) % 2:
        raise ValueError(f"fused_moe: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} disagree "
                         f"(format {fmt}: w13 [N, 2I, {cols(fmt, H)}], w2 [N, {H}, packed columns of I])")
    if fmt != "bf16" and (w13.dtype != quant.data_dtype(fmt) or w2.dtype != w13.dtype):
        raise ValueError(f"fused_moe: {fmt} weights must be {quant.data_dtype(fmt)}, got {w13.dtype} / {w2.dtype}")
    if expert_ids.shape != weights.shape or expert_ids.dim() != 2 or expert_ids.shape[0] != T:
        raise ValueError(f"fused_moe: expert_ids {tuple(expert_ids.shape)} / weights {tuple(weights.shape)} vs T={T}")
    if slot_table is not None and slot_table.dim() != 1:
        raise ValueError("fused_moe: slot_table must be [E]")
    _check_scales(fmt, scales, ((n, i2, H), (n, H, I)))
    if bias is not None and (bias[0].shape != (n, i2) or bias[1].shape != (n, H) or bias[0].stride(-1) != 1
                             or bias[1].stride(-1) != 1 or not bias[0].is_floating_point()
                             or fmt == "bf16" and bias[0].dtype != w13.dtype):
        raise ValueError(f"fused_moe: biases must be b13 [{n}, {i2}] and b2 [{n}, {H}], rows contiguous, in "
                         "the weights' dtype (any float dtype for a quantized format)")
    if host is not None and len(host) != (2 if bias is None else 4):
        raise ValueError("fused_moe: host experts have biases exactly when the slots have them")
    if host is not None and (host_fmt or fmt) != fmt:
        _check_host_format(host, host_fmt or fmt, host_scales, H, I)
        return
    if host is not None and not _twins(host[:2], (w13, w2)):
        raise ValueError("fused_moe: host weights must have the slot buffers' expert shape, inner strides and dtype "
                         "(and biases exactly when the slots have them)")
    if host is not None and scales is not None and (host_scales is None or not _twins(host_scales, scales)):
        raise ValueError(f"fused_moe: {fmt} host experts need host_scales with the slot scales' expert shape, "
                         "inner strides and dtype")


def _check_host_format(host: tuple[torch.Tensor, ...], host_fmt: str, host_scales: Pair | None, H: int,
                       I: int) -> None:
    """Host experts in a format of their own (e.g. int8 misses beside bf16 slots): their shapes, dtype, scales."""
    quant.check_format(host_fmt)
    e, cols = host[0].shape[0], quant.packed_cols
    if (host[0].shape != (e, 2 * I, cols(host_fmt, H)) or host[1].shape != (e, H, cols(host_fmt, I))
            or host_fmt != "bf16" and (host[0].dtype != quant.data_dtype(host_fmt) or host[1].dtype != host[0].dtype)):
        raise ValueError(f"fused_moe: {host_fmt} host experts must be w13 [E', {2 * I}, {cols(host_fmt, H)}], "
                         f"w2 [E', {H}, {cols(host_fmt, I)}] of {quant.data_dtype(host_fmt)}; got "
                         f"{tuple(host[0].shape)} {host[0].dtype}, {tuple(host[1].shape)}")
    _check_scales(host_fmt, host_scales, ((e, 2 * I, H), (e, H, I)))


def _twins(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    """Same per-expert shape, inner strides and dtype (device slots vs mapped host experts)."""
    return all(p.shape[1:] == q.shape[1:] and p.stride()[1:] == q.stride()[1:] and p.dtype == q.dtype
               for p, q in zip(a, b))


def _check_scales(fmt: str, scales: Pair | None, shapes: tuple[tuple[int, int, int], ...]) -> None:
    if fmt == "bf16" or scales is None:
        if (fmt == "bf16") != (scales is None):
            raise ValueError(f"fused_moe: {fmt} experts {'take no' if fmt == 'bf16' else 'need'} scales "
                             "(s13 [N, 2I, H // G], s2 [N, H, I // G])")
        return
    for s, (n, rows, k) in zip(scales, shapes):
        ng = s.shape[-1] if s.dim() == 3 else 0
        if (s.shape[:-1] != (n, rows) or ng == 0 or k % ng or s.dtype != quant.scale_dtype(fmt)
                or fmt in quant.PACKED and (k // ng) % 2):
            raise ValueError(f"fused_moe: {fmt} scales must be [{n}, {rows}, K // G] of {quant.scale_dtype(fmt)}, "
                             f"the group G dividing K={k}{' and even' if fmt in quant.PACKED else ''}; "
                             f"got {tuple(s.shape)} {s.dtype}")


def scale_groups(x: torch.Tensor, w13: torch.Tensor, scales: Pair | None) -> tuple[int, int]:
    """The groups along K of w13's and w2's scales (G = K // scale columns); (1, 1) without scales."""
    if scales is None:
        return 1, 1
    return x.shape[1] // scales[0].shape[-1], w13.shape[1] // 2 // scales[1].shape[-1]


def glu_torch(g: torch.Tensor, u: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """g, u [n, I] -> [n, I], as the kernels' epilogue computes it."""
    if activation == "clamped_swiglu":
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))
    if activation == "silu":
        return F.silu(g) * u
    return F.gelu(g, approximate="tanh" if activation == "gelu_tanh" else "none") * u


def compute_dtype(x: torch.Tensor, w13: torch.Tensor, fmt: str) -> torch.dtype:
    """The GEMMs' input dtype: the weights' own for bf16 (float) experts, the activations' for quantized ones."""
    return w13.dtype if fmt == "bf16" else x.dtype


def fused_moe_reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                        host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None,
                        alpha: float = 1.702, limit: float = 7.0, fmt: str = "bf16", scales: Pair | None = None,
                        host_scales: Pair | None = None, host_fmt: str | None = None) -> torch.Tensor:
    """Plain PyTorch with the semantics of fused_moe: fused_moe_reference_parts summed over k in fp32 (in k's
    order, as the kernels' sum), the result in x's dtype."""
    return fused_moe_reference_parts(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, alpha,
                                     limit, fmt, scales, host_scales, host_fmt).sum(1).to(x.dtype)


def fused_moe_reference_parts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                              w2: torch.Tensor, slot_table: torch.Tensor | None = None, activation: str = "silu",
                              host: tuple[torch.Tensor, ...] | None = None, bias: Pair | None = None,
                              alpha: float = 1.702, limit: float = 7.0, fmt: str = "bf16",
                              scales: Pair | None = None, host_scales: Pair | None = None,
                              host_fmt: str | None = None) -> torch.Tensor:
    """fused_moe's arguments -> [T, k, H] float32: each assignment's w_j · down(act(gate x) ⊙ up x), zeros where it
    has no work (no slot or weight 0); what fused_moe_parts gives. Each busy slot runs once on its rows (syncs with
    the host). Quantized experts are dequantized one busy slot at a time (quant.dequantize). GEMMs in compute_dtype
    (gate/up bias added before the activation, down bias before the routing weight). host_fmt: the host experts'
    format (default fmt), dequantized the same way."""
    check_args(x, expert_ids, weights, w13, w2, slot_table, activation, host, bias, fmt, scales, host_scales,
               host_fmt)
    T, k = expert_ids.shape
    I, n = w13.shape[1] // 2, w13.shape[0]
    n_all = n + (host[0].shape[0] if host is not None else 0)
    cdt = compute_dtype(x, w13, fmt)
    ids = expert_ids.long()  # [T, k]
    slots = ids if slot_table is None else slot_table.to(ids.device).long()[ids]  # [T, k]
    valid = (slots >= 0) & (slots < n_all) & (weights != 0)  # [T, k]
    out = torch.zeros(T, k, x.shape[1], dtype=torch.float32, device=x.device)  # [T, k, H]
    for s in slots[valid].unique().tolist():
        t, j = ((slots == s) & valid).nonzero(as_tuple=True)
        src, sc, f = ((w13, w2, *(bias or ())), scales, fmt) if s < n else (host, host_scales, host_fmt or fmt)
        e = s if s < n else s - n
        parts = [p[e].to(x.device) for p in src]  # type: ignore[union-attr]
        if sc is not None:  # [2I, H], [H, I]
            parts[:2] = [quant.dequantize(d, q[e].to(x.device), f) for d, q in zip(parts[:2], sc)]
        parts = [p.to(cdt) for p in parts]
        gu = x[t].to(cdt) @ parts[0].t()  # [r, 2I]
        if bias is not None:
            gu = gu + parts[2]
        h = glu_torch(gu[:, :I], gu[:, I:], activation, alpha, limit)  # [r, I]
        y = h @ parts[1].t()  # [r, H]
        if bias is not None:
            y = y + parts[3]
        out[t, j] = y.float() * weights[t, j].float()[:, None]  # each (t, j) once: slots are disjoint
    return out
