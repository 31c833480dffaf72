"""The decoder-only MoE transformer every family instantiates from its components, described by ArchArgs."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moetandem.experts.provider import ExpertProvider
from moetandem.models.cache import KVCache
from moetandem.models.components import (MLP, AttentionSpec, GatedDeltaNetSpec, RMSNorm, RouterSpec, SharedExpertSpec,
                                         rope_at)
from moetandem.models.components.linear import DecodeLinear
from moetandem.models.expert_activation import SWIGLU, ExpertActivation
from moetandem.models.moe import SparseMoE, run_moe


@dataclass
class ArchArgs:
    """Everything the shared model code needs, read from config.json by a family module: sizes, and the
    components (attention, router, shared expert) each layer is built from."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    rms_norm_eps: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    attention: AttentionSpec
    router: RouterSpec
    inv_freq: torch.Tensor
    rope_scaling: float = 1.0
    tie_word_embeddings: bool = False
    shared_expert: SharedExpertSpec | None = None
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer, None = full attention
    moe_layers: list[bool] = field(default_factory=list)  # per layer, False = dense MLP
    dense_intermediate_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    expert_activation: ExpertActivation = SWIGLU  # routed experts: activation and biases
    # hybrid stacks (Qwen3-Next, Qwen3.5): per layer "full_attention" or "linear_attention" (the latter built from
    # linear_attention); norm_kind: how every RMSNorm scales (components/norm.py)
    layer_types: list[str] = field(default_factory=list)
    linear_attention: GatedDeltaNetSpec | None = None
    norm_kind: str = "cast"
    # Gemma-style stacks: attention specs per layer (head size and KV heads differ by layer type), a RoPE table
    # (inv_freq, scaling) per layer type, the embedding scale, final logit soft-capping, the decoder-layer class
    layer_attention: list[Any] = field(default_factory=list)
    rope_by_type: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)
    embed_scale: float = 1.0
    final_logit_softcapping: float | None = None
    decoder: Callable[["ArchArgs", int], nn.Module] | None = None

    def __post_init__(self) -> None:
        self.sliding_windows = self.sliding_windows or [None] * self.num_layers
        self.moe_layers = self.moe_layers or [True] * self.num_layers
        self.layer_types = self.layer_types or ["full_attention"] * self.num_layers

    def is_linear(self, layer: int) -> bool:
        return self.layer_types[layer] == "linear_attention"

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.attention.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.attention.head_dim

    @property
    def norm_topk_prob(self) -> bool:
        return bool(getattr(self.router, "norm_topk_prob", False))

    def cache_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of what layer `layer` keeps in the KV cache."""
        if self.is_linear(layer):
            return ()
        return (self.layer_attention[layer] if self.layer_attention else self.attention).cache_shapes()

    def state_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        """Per-sequence shapes of what layer `layer` keeps (linear attention: conv and recurrent state)."""
        if not self.is_linear(layer):
            return ()
        assert self.linear_attention is not None
        return self.linear_attention.state_shapes()


class DecoderLayer(nn.Module):
    def __init__(self, a: ArchArgs, i: int) -> None:
        super().__init__()
        if a.is_linear(i):
            assert a.linear_attention is not None
            self.linear_attn = a.linear_attention.build(a.hidden_size, a.rms_norm_eps)
        else:
            self.self_attn = a.attention.build(a.hidden_size, a.rms_norm_eps)
        self.linear = a.is_linear(i)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_kind)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_kind)
        self.window = a.sliding_windows[i]
        self.mlp: SparseMoE | MLP = (
            SparseMoE(i, a.hidden_size, a.num_experts, a.top_k, a.router, a.shared_expert)
            if a.moe_layers[i] else MLP(a.hidden_size, a.dense_intermediate_size))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: tuple[torch.Tensor, ...],
                rows: torch.Tensor | None, pos: torch.Tensor, masks: dict[int | None, torch.Tensor], kv_len: int,
                valid: torch.Tensor | None, experts: Mapping[int, ExpertProvider]) -> torch.Tensor:
        if self.linear:
            h = x + self.linear_attn(self.input_layernorm(x), cache, rows, pos, valid)
        else:
            h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, rows, pos, masks[self.window], kv_len,
                                   window=self.window)
        y = self.post_attention_layernorm(h)
        if isinstance(self.mlp, SparseMoE):
            return h + run_moe(self.mlp, y, experts, valid)
        return h + self.mlp(y)


class Backbone(nn.Module):
    def __init__(self, a: ArchArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList((a.decoder or DecoderLayer)(a, i) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps, a.norm_kind)


class MoEForCausalLM(nn.Module):
    """Parameter names follow the hub layout after the family's renames (model.layers.N.self_attn.q_proj.weight,
    ...) so loading is a name map; expert weights are not parameters: each forward takes `experts`, MoE layer ->
    the ExpertProvider that computes it (the engine owns that mapping; the model never stores one)."""

    def __init__(self, a: ArchArgs) -> None:
        super().__init__()
        self.args = a
        self.model = Backbone(a)
        self.lm_head = DecodeLinear(a.hidden_size, a.vocab_size, bias=False)  # tuned GEMV at decode
        #: rotary kind ("": the model's; else a layer type with its own) -> (inv_freq [D/2] fp32 on the device,
        #: scaling), set by init_rope; cos/sin are computed per step from the positions (rope_at)
        self.rope_freqs: dict[str, tuple[torch.Tensor, float]] = {}
        self.embed_scale = 1.0

    def init_rope(self, device: torch.device) -> None:
        """Each rotary kind's frequencies on the device; after the weights are placed."""
        kinds = {"": (self.args.inv_freq, self.args.rope_scaling), **self.args.rope_by_type}
        self.rope_freqs = {k: (f.float().to(device), float(s)) for k, (f, s) in kinds.items()}
        # the scale rounded to the weights' dtype, as transformers applies it
        dtype = self.model.embed_tokens.weight.dtype
        self.embed_scale = float(torch.tensor(self.args.embed_scale, dtype=dtype))

    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def moe_blocks(self) -> list[SparseMoE]:
        return [m for layer in self.model.layers for m in layer.children() if isinstance(m, SparseMoE)]

    def forward(self, input_ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
                experts: Mapping[int, ExpertProvider], valid: torch.Tensor | None = None,
                last_only: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/pos [B, L]; writes K/V at pos and attends to cache positions < kv_len.
        valid [B, L]: real (non-padding) tokens; last_only [B]: the one row per sequence whose logits are wanted;
        rows [B]: the cache row of each sequence (default: row b). Returns logits [B, L|1, V]."""
        x = self.embed(input_ids)  # [B, L, H]
        x = self.forward_layers(x, pos, cache, kv_len, 0, self.args.num_layers, experts, valid, rows)
        return self.head(x, last_only)

    # ---- pieces of forward, for split execution (layers [0, a) and [L-b, L) on the end, the rest in the cloud)
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] -> hidden states [B, L, H]."""
        x = self.model.embed_tokens(input_ids)  # [B, L, H]
        return x if self.embed_scale == 1.0 else x * self.embed_scale

    def forward_layers(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int, start: int, end: int,
                       experts: Mapping[int, ExpertProvider], valid: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Run layers [start, end) on hidden states x [B, L, H] at positions pos [B, L]; same arguments as
        forward. Only cache.layers[start:end] are touched."""
        a = self.args
        kind = [t if t in self.rope_freqs else "" for t in a.layer_types]  # each layer's rotary kind ("": the model's)
        rope = {}
        for t in set(kind[start:end]):
            cos, sin = rope_at(pos, *self.rope_freqs[t])  # [B, L, D] each
            rope[t] = cos.to(x.dtype), sin.to(x.dtype)
        kpos = torch.arange(kv_len, device=pos.device)
        causal = kpos[None, None, :] <= pos[:, :, None]  # [B, L, S]
        masks: dict[int | None, torch.Tensor] = {None: causal[:, None]}
        for w in {l.window for l in self.model.layers[start:end]} - {None}:
            masks[w] = (causal & (kpos[None, None, :] > pos[:, :, None] - w))[:, None]
        for i in range(start, end):
            cos, sin = rope[kind[i]]
            x = self.model.layers[i](x, cos, sin, cache.layers[i], rows, pos, masks, kv_len, valid, experts)
        return x

    def head(self, x: torch.Tensor, last_only: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + lm_head: x [B, L, H] -> logits [B, L, V], or [B, 1, V] at last_only [B]."""
        if last_only is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_only][:, None]  # [B, 1, H]
        logits = self.lm_head(self.model.norm(x))  # [B, L, V]
        cap = self.args.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
