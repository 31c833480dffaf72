"""The encoder-decoder MoE transformer (Switch Transformers, T5-style), described by Seq2SeqArgs. Module names
mirror the hub layout (encoder.block.N.layer.M...), so loading is the same name map as for decoder-only families.

MoE layers of both stacks share one index space for the expert providers: encoder block i is MoE layer i, decoder
block j is MoE layer (encoder layers + j); `layer_keys` names each one's checkpoint prefix for the ExpertStore."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moetandem.errors import UnsupportedModelError
from moetandem.experts.provider import ExpertProvider
from moetandem.models.cache import KVCache
from moetandem.models.components import RelativeBias, ReluMLP, RMSNorm, T5Attention, Top1
from moetandem.models.expert_activation import ExpertActivation
from moetandem.models.moe import SparseMoE, run_moe


@dataclass
class Seq2SeqArgs:
    vocab_size: int
    hidden_size: int
    num_heads: int
    head_dim: int
    dense_intermediate_size: int
    num_experts: int
    moe_intermediate_size: int
    expert_capacity: int
    encoder_sparse: list[bool]  # per encoder block: a MoE feed-forward
    decoder_sparse: list[bool]
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    router_bias: bool = False
    tie_word_embeddings: bool = True
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    decoder_start_token_id: int = 0
    #: a nominal limit for source and target lengths (relative positions have none)
    max_position_embeddings: int = 4096
    expert_activation: ExpertActivation = ExpertActivation("relu")
    top_k: int = 1
    is_seq2seq: bool = True

    @property
    def encoder_layers(self) -> int:
        return len(self.encoder_sparse)

    @property
    def decoder_layers(self) -> int:
        return len(self.decoder_sparse)

    @property
    def num_layers(self) -> int:
        """Both stacks: the MoE layer index space."""
        return self.encoder_layers + self.decoder_layers

    @property
    def moe_layers(self) -> list[bool]:
        return self.encoder_sparse + self.decoder_sparse

    @property
    def layer_keys(self) -> list[str]:
        """Checkpoint prefix of each layer's feed-forward (what {l} stands for in the family's expert names)."""
        return ([f"encoder.block.{i}.layer.1" for i in range(self.encoder_layers)]
                + [f"decoder.block.{j}.layer.2" for j in range(self.decoder_layers)])

    def decoder_cache(self) -> "DecoderCacheLayout":
        return DecoderCacheLayout(self.decoder_layers, self.num_heads, self.head_dim)


@dataclass(frozen=True)
class DecoderCacheLayout:
    """KVCache layout of the decoder's self-attention: K and V [nH, D] per token and layer."""

    num_layers: int
    num_heads: int
    head_dim: int

    def cache_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        return (self.num_heads, self.head_dim), (self.num_heads, self.head_dim)

    def state_shapes(self, layer: int) -> tuple[tuple[int, ...], ...]:
        return ()


class CapacityMoE(SparseMoE):
    """Top-1 MoE that drops, per sequence and in token order, what exceeds an expert's capacity (those tokens pass
    through on the residual alone), as transformers does at inference too. A decode step sees one token, so only
    encoder passes and teacher-forced decoder passes can exceed it."""

    def __init__(self, layer: int, a: Seq2SeqArgs) -> None:
        super().__init__(layer, a.hidden_size, a.num_experts, 1, Top1(a.router_bias))
        self.capacity = a.expert_capacity

    def forward(self, x: torch.Tensor, provider: ExpertProvider, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, L, H = x.shape
        flat = x.reshape(-1, H)  # [T, H]
        ids, w = self.gate.select(self.gate(flat), x.dtype)  # [T, 1] each
        onehot = F.one_hot(ids.view(B, L), self.num_experts)  # [B, L, E]
        place = (onehot.cumsum(dim=1) * onehot).sum(dim=-1)  # [B, L]: the token's place in its expert's queue
        w = w * (place <= self.capacity).reshape(-1, 1).to(w.dtype)  # weight 0: computes nothing
        if valid is not None:
            keep = valid.reshape(-1)
            flat, ids, w = flat[keep], ids[keep], w[keep]
        y = provider.compute(self.layer, flat, ids, w)  # [T', H]
        if valid is not None:
            y = torch.zeros_like(x.reshape(-1, H)).index_put_((keep,), y)
        return y.view(B, L, H)


class SelfAttentionSub(nn.Module):
    def __init__(self, a: Seq2SeqArgs) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(a.hidden_size, a.num_heads, a.head_dim)
        self.layer_norm = RMSNorm(a.hidden_size, a.eps)


class CrossAttentionSub(nn.Module):
    def __init__(self, a: Seq2SeqArgs) -> None:
        super().__init__()
        self.EncDecAttention = T5Attention(a.hidden_size, a.num_heads, a.head_dim)
        self.layer_norm = RMSNorm(a.hidden_size, a.eps)


class FeedForwardSub(nn.Module):
    def __init__(self, a: Seq2SeqArgs, layer: int, sparse: bool) -> None:
        super().__init__()
        self.mlp: CapacityMoE | ReluMLP = (CapacityMoE(layer, a) if sparse
                                           else ReluMLP(a.hidden_size, a.dense_intermediate_size))
        self.layer_norm = RMSNorm(a.hidden_size, a.eps)

    def forward(self, h: torch.Tensor, experts: Mapping[int, ExpertProvider], valid: torch.Tensor | None
                ) -> torch.Tensor:
        y = self.layer_norm(h)
        return h + (run_moe(self.mlp, y, experts, valid) if isinstance(self.mlp, CapacityMoE) else self.mlp(y))


class Block(nn.Module):
    """layer[0] self-attention, (decoder) layer[1] cross-attention, layer[-1] feed-forward; pre-norm residuals."""

    def __init__(self, a: Seq2SeqArgs, layer: int, sparse: bool, decoder: bool) -> None:
        super().__init__()
        subs: list[nn.Module] = [SelfAttentionSub(a)]
        if decoder:
            subs.append(CrossAttentionSub(a))
        self.layer = nn.ModuleList([*subs, FeedForwardSub(a, layer, sparse)])


class Stack(nn.Module):
    def __init__(self, a: Seq2SeqArgs, decoder: bool) -> None:
        super().__init__()
        sparse, first = (a.decoder_sparse, a.encoder_layers) if decoder else (a.encoder_sparse, 0)
        self.block = nn.ModuleList(Block(a, first + i, s, decoder) for i, s in enumerate(sparse))
        self.rel_bias = RelativeBias(a.num_heads, a.num_buckets, a.max_distance, bidirectional=not decoder)
        self.final_layer_norm = RMSNorm(a.hidden_size, a.eps)


def key_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """mask [B, S] bool (True = real token) -> additive [B, 1, 1, S] (−inf on padding keys)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))[:, None, None]


class Seq2SeqLM(nn.Module):
    """Expert weights are not parameters: encode / decode take `experts`, MoE layer -> ExpertProvider."""

    def __init__(self, a: Seq2SeqArgs) -> None:
        super().__init__()
        self.args = a
        self.shared = nn.Embedding(a.vocab_size, a.hidden_size)
        self.encoder, self.decoder = Stack(a, decoder=False), Stack(a, decoder=True)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, *_: object, **__: object) -> torch.Tensor:
        """The decoder-only step (Engine.forward: trace, calibrate from outputs, the batcher) has no meaning here."""
        raise UnsupportedModelError("this is an encoder-decoder (text-to-text) model; this command runs decoder-only "
                                    "models: use `moetandem generate` or `moetandem eval` with it")

    def init_rope(self, device: torch.device) -> None:
        """Nothing to build: positions are the stacks' learned relative bias."""

    def input_embeddings(self) -> nn.Embedding:
        return self.shared

    def moe_blocks(self) -> list[SparseMoE]:
        return [m for m in self.modules() if isinstance(m, CapacityMoE)]

    def encode(self, ids: torch.Tensor, mask: torch.Tensor, experts: Mapping[int, ExpertProvider]) -> torch.Tensor:
        """Source ids [B, S] with mask [B, S] (True = real token) -> encoder output [B, S, H]."""
        x = self.shared(ids)  # [B, S, H]
        pos = torch.arange(ids.shape[1], device=ids.device)
        bias = self.encoder.rel_bias(pos[None], pos) + key_mask(mask, x.dtype)  # [B, nH, S, S]
        for blk in self.encoder.block:
            attn, ff = blk.layer
            x = x + attn.SelfAttention.self_attend(attn.layer_norm(x), bias)
            x = ff(x, experts, mask)
        return self.encoder.final_layer_norm(x)

    def cross_kv(self, enc: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder layer's cross-attention K, V [B, nH, S, D] of the encoder output, computed once."""
        return [blk.layer[1].EncDecAttention.cross_kv(enc) for blk in self.decoder.block]

    def decode(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, kv_len: int,
               cross: list[tuple[torch.Tensor, torch.Tensor]], enc_mask: torch.Tensor,
               experts: Mapping[int, ExpertProvider], valid: torch.Tensor | None = None) -> torch.Tensor:
        """Target ids/pos [B, L]: writes self-attention K/V at pos, attends to cache positions < kv_len and to the
        encoder output (cross K/V, enc_mask [B, S]). Returns logits [B, L, V]."""
        x = self.shared(ids)  # [B, L, H]
        kpos = torch.arange(kv_len, device=ids.device)
        causal = torch.zeros(pos.shape[0], 1, pos.shape[1], kv_len, dtype=x.dtype, device=ids.device)
        causal = causal.masked_fill(kpos[None, None, None, :] > pos[:, None, :, None], float("-inf"))  # [B, 1, L, S]
        bias = self.decoder.rel_bias(pos, kpos) + causal  # [B, nH, L, S]
        cross_bias = key_mask(enc_mask, x.dtype)  # [B, 1, 1, S_enc]
        for blk, kv, layer_cache in zip(self.decoder.block, cross, cache.layers):
            attn, xattn, ff = blk.layer
            x = x + attn.SelfAttention.self_attend(attn.layer_norm(x), bias, layer_cache, pos, kv_len)
            x = x + xattn.EncDecAttention.attend(xattn.layer_norm(x), *kv, cross_bias)
            x = ff(x, experts, valid)
        x = self.decoder.final_layer_norm(x)
        if self.args.tie_word_embeddings:  # T5 rescales before the tied projection
            x = x * self.args.hidden_size ** -0.5
        return self.lm_head(x)  # [B, L, V]
