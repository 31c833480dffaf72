"""The gated delta rule (Gated DeltaNet's recurrence), per value head with state S [dk, dv]:

    S_t = exp(g_t) · S_{t-1} + k_t ⊗ β_t (v_t − exp(g_t) · S_{t-1}ᵀ k_t)        o_t = S_tᵀ q_t / √dk

in two PyTorch forms: `chunked` (prefill: a UT transform per chunk of 64 tokens, then one scan over chunks) and
`recurrent` (decode: token by token). On CUDA, flash-linear-attention's kernels are used when installed
(`pip install moetandem[linear-gpu]`); they are never required. A token with g = 0 and β = 0 leaves the state
exactly as it was, which is how right-padding stays out of a sequence's state."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
             beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, L, h, d] inputs -> fp32 [B, nV, L, d] (q/k heads repeated for grouped value heads, l2-normed, q scaled);
    g, beta [B, L, nV] -> [B, nV, L]."""
    rep = v.shape[2] // k.shape[2]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    q, k, v, g, beta = (t.transpose(1, 2).float().contiguous() for t in (q, k, v, g, beta))
    q, k = l2norm(q), l2norm(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
              state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [B, L, nK, dk], v [B, L, nV, dv], g/beta [B, L, nV], state [B, nV, dk, dv] (fp32)
    -> out [B, L, nV, dv] (v's dtype), final state [B, nV, dk, dv] (fp32)."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    S = state.float()
    out = torch.empty_like(v)  # [B, nV, L, dv]
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None]
        kv_mem = (S * k[:, :, t, :, None]).sum(dim=-2)  # [B, nV, dv]
        delta = (v[:, :, t] - kv_mem) * beta[:, :, t, None]  # [B, nV, dv]
        S = S + k[:, :, t, :, None] * delta[:, :, None, :]
        out[:, :, t] = (S * q[:, :, t, :, None]).sum(dim=-2)
    return out.transpose(1, 2).to(dtype), S


def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            state: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `recurrent`, O(L/chunk) sequential steps (transformers' torch_chunk_gated_delta_rule)."""
    dtype, L = v.dtype, q.shape[1]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    pad = (chunk - L % chunk) % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # [B, nV, Lp, d]
    g, beta = (F.pad(t, (0, pad)) for t in (g, beta))  # [B, nV, Lp]
    B, nV, Lp, _ = v.shape
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    # [B, nV, N, C, d]: N chunks of C tokens
    q, k, k_beta, v_beta = (t.reshape(B, nV, Lp // chunk, chunk, -1) for t in (q, k, k_beta, v_beta))
    cum = g.reshape(B, nV, Lp // chunk, chunk).cumsum(dim=-1)  # [B, nV, N, C]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [B, nV, N, C, C]
    ut = (k_beta @ k.transpose(-1, -2)) * decay  # [B, nV, N, C, C], unit lower-triangular system
    intra = (q @ k.transpose(-1, -2)) * decay
    new_v = torch.linalg.solve_triangular(ut, v_beta, upper=False, unitriangular=True)  # [B, nV, N, C, dv]
    k_cum = torch.linalg.solve_triangular(ut, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, nV, N, 1, 1]
    S = state.float()
    out = torch.empty_like(new_v)
    for i in range(Lp // chunk):
        v_new = new_v[:, :, i] - k_cum[:, :, i] @ S  # [B, nV, C, dv]
        out[:, :, i] = q[:, :, i] @ S + intra[:, :, i] @ v_new
        S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(B, nV, Lp, -1)[:, :, :L]
    return out.transpose(1, 2).to(dtype), S


def _fla() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:  # optional GPU kernels (flash-linear-attention / fla-core)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
    except Exception:  # noqa: BLE001 - not installed, or no working Triton
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


_FLA: list[Any] = []


@torch.library.custom_op("moetandem::fla_gated_delta_rule", mutates_args=())
def fla_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-linear-attention's kernels as one opaque op (shapes as `recurrent`): torch.compile does not trace
    into fla's Python and Triton code, and a CUDA graph captures the launches."""
    chunk_fn, step_fn = _FLA[0]
    rep = v.shape[2] // k.shape[2]
    if rep > 1:
        q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    fn = step_fn if q.shape[1] == 1 else chunk_fn
    out, final = fn(q, k, v, g=g.float(), beta=beta.to(q.dtype), initial_state=state.float(),
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = out.to(v.dtype), final.float()
    # a custom op's outputs alias no input: copy only if the kernel handed back the state it was given
    return out, final.clone() if final.data_ptr() == state.data_ptr() else final


@fla_gated_delta_rule.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
      state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(v), torch.empty(state.shape, dtype=torch.float32, device=state.device)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: flash-linear-attention on CUDA if installed, else chunked (L > 1) or recurrent (L == 1)."""
    if q.is_cuda:
        if not _FLA:
            _FLA.append(_fla())
        if _FLA[0] is not None:
            return fla_gated_delta_rule(q, k, v, g, beta, state)
    return (recurrent if q.shape[1] == 1 else chunked)(q, k, v, g, beta, state)
