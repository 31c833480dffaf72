"""OLMoE: GQA with q/k RMSNorm over all heads (before the head split) and optional QKV clipping; softmax router."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SoftmaxTopK
from moetandem.models.family import Family, common_args, gqa, need
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    bias = bool(c.get("attention_bias", False))
    return common_args(
        c, path, num_experts=int(need(c, path, "num_experts", "num_local_experts")),
        moe_intermediate_size=int(need(c, path, "intermediate_size")),
        attention=gqa(c, path, qkv_bias=bias, o_bias=bias, qk_norm="full", clip_qkv=c.get("clip_qkv")),
        router=SoftmaxTopK(norm_topk_prob=bool(c.get("norm_topk_prob", False))))


FAMILY = Family(model_type="olmoe", args=args, expert_keys=EXPERT_KEYS)
