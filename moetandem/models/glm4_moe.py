"""GLM-4.5 / 4.6 (-Air): GQA with q/k/v bias, optional per-head q/k RMSNorm and partial rotary (half the head);
the DeepSeek-V3 router (sigmoid + correction bias, group-limited top-k, routed scaling); plain shared experts; the
first k layers dense. The MTP layer of the released checkpoints is not run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import SharedExpertSpec
from moetandem.models.deepseek_v2 import SHARED
from moetandem.models.deepseek_v3 import sigmoid_router
from moetandem.models.family import Family, common_args, first_dense_layers, gqa, need, reject_quantized
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    reject_quantized(c, path)
    c = {"partial_rotary_factor": 0.5, **c}  # transformers' default for this family
    inter, n_shared = int(need(c, path, "moe_intermediate_size")), int(c.get("n_shared_experts") or 0)
    return common_args(
        c, path, num_experts=int(need(c, path, "n_routed_experts", "num_local_experts")), moe_intermediate_size=inter,
        attention=gqa(c, path, qkv_bias=bool(c.get("attention_bias", False)),
                      qk_norm="head" if c.get("use_qk_norm") else None),
        router=sigmoid_router(c), shared_expert=SharedExpertSpec(inter * n_shared) if n_shared else None,
        moe_layers=first_dense_layers(c, int(need(c, path, "num_hidden_layers"))),
        dense_intermediate_size=int(need(c, path, "intermediate_size")))


FAMILY = Family(model_type="glm4_moe", args=args, expert_keys=EXPERT_KEYS, renames=SHARED)
