"""gpt-oss-20b / 120b: GQA with biases, attention sinks, sliding-window layers alternating with full ones (YaRN
RoPE); a router with a bias that takes the top-k logits and softmaxes them; routed experts with biases and a
clamped SwiGLU, gate/up interleaved in one [E, H, 2I] tensor (or MXFP4 on the hub, dequantized by the
ExpertStore on read)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import TopKSoftmax
from moetandem.models.expert_activation import ExpertActivation
from moetandem.models.family import Family, common_args, gqa, need, reject_quantized
from moetandem.models.transformer import ArchArgs

EXPERTS = "model.layers.{l}.mlp.experts."


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    reject_quantized(c, path, allow=("mxfp4",))  # MXFP4 experts: dequantized on read; other weights are bf16
    bias = bool(c.get("attention_bias", True))
    act = ExpertActivation("clamped_swiglu", bias=True, alpha=float(c.get("swiglu_alpha", 1.702)),
                           limit=float(c.get("swiglu_limit", 7.0)))
    return common_args(c, path, num_experts=int(need(c, path, "num_local_experts", "num_experts")),
                       moe_intermediate_size=int(need(c, path, "intermediate_size")),
                       attention=gqa(c, path, qkv_bias=bias, o_bias=bias, sinks=True), router=TopKSoftmax(bias=True),
                       expert_activation=act)


FAMILY = Family(
    model_type="gpt_oss",
    args=args,
    # one tensor per layer for all experts: gate_up [E, H, 2I] (gate, up interleaved along 2I) + bias [E, 2I],
    # down [E, I, H] + bias [E, H]; on the hub as MXFP4 *_blocks / *_scales instead of the bf16 matrices
    expert_keys=(EXPERTS + "gate_up_proj", EXPERTS + "gate_up_proj_bias", EXPERTS + "down_proj",
                 EXPERTS + "down_proj_bias", EXPERTS + "gate_up_proj_blocks", EXPERTS + "gate_up_proj_scales",
                 EXPERTS + "down_proj_blocks", EXPERTS + "down_proj_scales"),
    fused=(),
    expert_layout="gpt_oss",
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
)
