"""Qwen3-Next (80B-A3B): a hybrid stack, three Gated DeltaNet linear-attention layers to one gated full-attention
layer (`layer_types`, or every `full_attention_interval`-th layer); full attention has per-head zero-centred q/k
norms, an output gate and partial rotary (a quarter of the head); 512 experts (softmax top-k, renormalised) beside
a sigmoid-gated shared expert; every RMSNorm is zero-centred (1 + w). The MTP layers of the release are not run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.errors import UnsupportedModelError
from moetandem.models.components import GatedDeltaNetSpec, SharedExpertSpec, SoftmaxTopK
from moetandem.models.family import Family, common_args, gqa, need, reject_quantized, sparse_layers
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs

SHARED_GATE = ((r"\.mlp\.shared_expert_gate\.", ".mlp.shared_expert.gate."),)


def layer_types(c: dict[str, Any], path: Path) -> list[str]:
    layers = int(need(c, path, "num_hidden_layers"))
    every = int(c.get("full_attention_interval", 4))
    types = c.get("layer_types") or ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                     for i in range(layers)]
    if len(types) != layers or set(types) - {"full_attention", "linear_attention"}:
        raise UnsupportedModelError(f"{path / 'config.json'}: layer_types must name full_attention or "
                                    f"linear_attention for each of the {layers} layers")
    return list(types)


def hybrid_args(c: dict[str, Any], path: Path, *, fused_proj: bool, moe_layers: list[bool],
                norm_topk_prob: bool) -> ArchArgs:
    """Qwen3-Next and Qwen3.5-MoE differ only in the linear projections' layout, dense layers and renorm."""
    reject_quantized(c, path)
    c = {"partial_rotary_factor": 0.25, **c}  # transformers' default for these families
    linear = GatedDeltaNetSpec(
        num_k_heads=int(need(c, path, "linear_num_key_heads")),
        num_v_heads=int(need(c, path, "linear_num_value_heads")),
        head_k_dim=int(need(c, path, "linear_key_head_dim")), head_v_dim=int(need(c, path, "linear_value_head_dim")),
        conv_kernel=int(c.get("linear_conv_kernel_dim", 4)), fused_proj=fused_proj)
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    return common_args(
        c, path, num_experts=int(need(c, path, "num_experts")),
        moe_intermediate_size=int(need(c, path, "moe_intermediate_size")),
        attention=gqa(c, path, qkv_bias=bool(c.get("attention_bias", False)), qk_norm="head", output_gate=True,
                      norm_kind="offset"),
        router=SoftmaxTopK(norm_topk_prob=norm_topk_prob),
        shared_expert=SharedExpertSpec(shared, gated=True) if shared else None, moe_layers=moe_layers,
        dense_intermediate_size=int(c.get("intermediate_size") or 0), layer_types=layer_types(c, path),
        linear_attention=linear, norm_kind="offset")


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    return hybrid_args(c, path, fused_proj=True, norm_topk_prob=bool(c.get("norm_topk_prob", True)),
                       moe_layers=sparse_layers(c, int(need(c, path, "num_hidden_layers"))))


FAMILY = Family(model_type="qwen3_next", args=args, expert_keys=EXPERT_KEYS, renames=SHARED_GATE)
