"""gpt-oss-20b / 120b: GQA with biases, attention sinks, sliding-window layers alternating with full ones (YaRN
RoPE); a router with a bias that takes the top-k logits and softmaxes them. Its routed experts (gate/up
interleaved, biases, clamped SwiGLU, MXFP4 on the hub) need expert-format support the providers do not have yet,
so moetandem refuses to run it (see `experts_unsupported`); everything else is here and tested against
transformers with the experts supplied by the test."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.models.components import TopKSoftmax
from moetandem.models.family import Family, common_args, gqa, need
from moetandem.models.transformer import ArchArgs

EXPERTS = "model.layers.{l}.mlp.experts."


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    bias = bool(c.get("attention_bias", True))
    return common_args(c, path, num_experts=int(need(c, path, "num_local_experts", "num_experts")),
                       moe_intermediate_size=int(need(c, path, "intermediate_size")),
                       attention=gqa(c, path, qkv_bias=bias, o_bias=bias, sinks=True), router=TopKSoftmax(bias=True))


FAMILY = Family(
    model_type="gpt_oss",
    args=args,
    # one tensor per layer for all experts: gate_up [E, H, 2I] (gate, up interleaved along 2I) + bias [E, 2I],
    # down [E, I, H] + bias [E, H]; on the hub as MXFP4 *_blocks / *_scales instead of the bf16 matrices
    expert_keys=(EXPERTS + "gate_up_proj", EXPERTS + "gate_up_proj_bias", EXPERTS + "down_proj",
                 EXPERTS + "down_proj_bias", EXPERTS + "gate_up_proj_blocks", EXPERTS + "gate_up_proj_scales",
                 EXPERTS + "down_proj_blocks", EXPERTS + "down_proj_scales"),
    fused=(),
    renames=((r"\.mlp\.router\.", ".mlp.gate."),),
    experts_unsupported=("gpt-oss routed experts (per-expert biases, clamped SwiGLU with interleaved gate/up, "
                         "MXFP4 weights) are not supported by moetandem's expert providers yet"),
)
