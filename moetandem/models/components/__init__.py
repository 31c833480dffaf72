"""The parts a family is assembled from: attention variants (with what each caches), routers, feed-forward
pieces (expert activation, dense MLP, shared experts), RMSNorm and RoPE, and the Gated DeltaNet linear attention."""
from __future__ import annotations

from moetandem.models.components.attention import Attention, GQASpec
from moetandem.models.components.deltanet import GatedDeltaNet, GatedDeltaNetSpec
from moetandem.models.components.gemma_attention import GemmaAttention, GemmaAttentionSpec
from moetandem.models.components.mla import MLASpec, MLAttention
from moetandem.models.components.mlp import (MLP, GeGLUMLP, ReluMLP, SharedExpert, SharedExpertSpec, expert_ffn,
                                             swiglu)
from moetandem.models.components.norm import RMSNorm
from moetandem.models.components.t5_attention import RelativeBias, T5Attention
from moetandem.models.components.rope import apply_rope, apply_rope_interleaved, rope_at, rope_tables
from moetandem.models.components.routers import (Router, RouterSpec, ScaledSoftmaxTopK, SigmoidGroupTopK,
                                                 SoftmaxGroupGreedy, SoftmaxTopK, Top1, TopKSoftmax)

AttentionSpec = GQASpec | MLASpec | GemmaAttentionSpec

__all__ = ["MLP", "Attention", "AttentionSpec", "GQASpec",
           "GatedDeltaNet", "GatedDeltaNetSpec", "GeGLUMLP", "GemmaAttention", "GemmaAttentionSpec",
           "ScaledSoftmaxTopK", "MLASpec", "MLAttention", "RMSNorm", "RelativeBias", "ReluMLP", "Router",
           "RouterSpec", "SharedExpert", "SharedExpertSpec", "SigmoidGroupTopK", "SoftmaxGroupGreedy", "SoftmaxTopK",
           "T5Attention", "Top1", "TopKSoftmax", "apply_rope", "apply_rope_interleaved", "expert_ffn", "rope_at", "rope_tables", "swiglu"]
