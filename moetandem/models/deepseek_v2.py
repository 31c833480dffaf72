"""DeepSeek-V2 / V2-Lite / V2.5: multi-head latent attention, softmax router with greedy or group-limited greedy
top-k and a routed scaling factor, n_shared_experts plain shared experts, the first k layers dense."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moetandem.errors import UnsupportedModelError
from moetandem.models.components import MLASpec, SharedExpertSpec, SoftmaxGroupGreedy
from moetandem.models.family import Family, common_args, first_dense_layers, need, reject_quantized, rope_params
from moetandem.models.qwen2_moe import EXPERT_KEYS
from moetandem.models.transformer import ArchArgs

#: the shared experts are one resident MLP of n_shared_experts · moe_intermediate_size
SHARED = ((r"\.mlp\.shared_experts\.", ".mlp.shared_expert."),)


def mla(c: dict[str, Any], path: Path) -> MLASpec:
    nope, rope = int(need(c, path, "qk_nope_head_dim")), int(need(c, path, "qk_rope_head_dim"))
    scale = (nope + rope) ** -0.5
    p = rope_params(c)
    if (p.get("rope_type") or p.get("type") or "default") != "default" and p.get("mscale_all_dim"):
        factor = float(p["factor"])
        m = 0.1 * float(p["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0  # yarn mscale
        scale *= m * m
    q_lora = c.get("q_lora_rank")
    return MLASpec(num_heads=int(need(c, path, "num_attention_heads")), q_lora_rank=None if q_lora is None else int(q_lora),
                   kv_lora_rank=int(need(c, path, "kv_lora_rank")), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                   v_head_dim=int(need(c, path, "v_head_dim")), softmax_scale=scale,
                   interleaved_rope=bool(c.get("rope_interleave", True)), bias=bool(c.get("attention_bias", False)))


def deepseek_args(c: dict[str, Any], path: Path, router: Any, hf_type: str | None = None) -> ArchArgs:
    reject_quantized(c, path)
    inter = int(need(c, path, "moe_intermediate_size"))
    n_shared = int(c.get("n_shared_experts") or 0)
    return common_args(
        c, path, num_experts=int(need(c, path, "n_routed_experts", "num_local_experts")), moe_intermediate_size=inter,
        attention=mla(c, path), router=router, hf_type=hf_type,
        shared_expert=SharedExpertSpec(inter * n_shared) if n_shared else None,
        moe_layers=first_dense_layers(c, int(need(c, path, "num_hidden_layers"))),
        dense_intermediate_size=int(need(c, path, "intermediate_size")))


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    # transformers ignores norm_topk_prob here, and every released V2 checkpoint has it false
    router = SoftmaxGroupGreedy(method=str(c.get("topk_method") or "greedy"), n_group=int(c.get("n_group") or 1),
                                topk_group=int(c.get("topk_group") or 1),
                                routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)))
    if router.method not in ("greedy", "group_limited_greedy"):
        raise UnsupportedModelError(f"{path / 'config.json'}: topk_method {router.method!r} is not supported")
    return deepseek_args(c, path, router)


FAMILY = Family(model_type="deepseek_v2", args=args, expert_keys=EXPERT_KEYS, renames=SHARED)
