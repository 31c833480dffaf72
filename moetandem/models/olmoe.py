"""OLMoE: q/k RMSNorm over all heads (before the head split), optional QKV clipping."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.family import Family, common_args, need
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    bias = bool(c.get("attention_bias", False))
    return common_args(
        c, path, num_experts=int(need(c, path, "num_experts", "num_local_experts")), moe_intermediate_size=int(need(c, path, "intermediate_size")),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)), qkv_bias=bias, o_bias=bias, qk_norm="full",
        clip_qkv=c.get("clip_qkv"))


FAMILY = Family(model_type="olmoe", args=args, expert_keys=EXPERT_KEYS)
