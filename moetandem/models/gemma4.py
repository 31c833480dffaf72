"""Gemma-4 MoE (26B-A4B): sliding-window layers (5 : 1) and full-attention layers with their own head size, KV
heads and proportional partial RoPE, values from the key projection (`attention_k_eq_v`); q/k/v norms, sandwich
norms, a dense GeGLU MLP beside 128 GeGLU experts (models/sandwich.py), a scaled embedding and final logit
soft-capping. The multimodal release (`gemma4`) loads its text model. Per-layer embeddings and KV sharing (the
small dense Gemma-4 models) are refused. Its routed experts are GeGLU (GELU-tanh gate), an expert activation the
providers, the fused kernel and the committee's host path all run."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moetandem.errors import UnsupportedModelError
from moetandem.models.components import GemmaAttentionSpec, ScaledSoftmaxTopK
from moetandem.models.family import FUSED, Family, common_args, need, reject_quantized, text_config
from moetandem.models.sandwich import SandwichLayer
from moetandem.models.transformer import ArchArgs
from moetandem.models.expert_activation import ExpertActivation

FUSED_GEMMA = tuple(k.replace(".mlp.experts.", ".experts.") for k in FUSED)
EXPERT_KEYS = tuple(f"model.layers.{{l}}.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down"))
RENAMES = ((r"\.router\.proj\.", ".moe.gate."), (r"\.router\.", ".moe.gate."),
           (r"\.pre_feedforward_layernorm_2\.", ".moe.pre_norm."))


def _inv_freq(p: dict[str, Any], head_dim: int) -> torch.Tensor:
    """inv_freq [D/2] of one layer type: default RoPE, or proportional (the first partial_rotary_factor of the
    angles turn, with the full head size as denominator; the rest stay still)."""
    base, kind = float(p.get("rope_theta", 10000.0)), p.get("rope_type", "default")
    if kind == "default":
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if kind != "proportional":
        raise UnsupportedModelError(f"Gemma-4 rope_type {kind!r} is not supported")
    angles = int(float(p.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    rot = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    return torch.cat([rot, torch.zeros(head_dim // 2 - angles)]) / float(p.get("factor", 1.0))


def args(c: dict[str, Any], path: Path) -> ArchArgs:
    c = text_config(c)
    reject_quantized(c, path)
    if not c.get("enable_moe_block"):
        raise UnsupportedModelError(f"{path}: a dense Gemma-4 (enable_moe_block false); moetandem runs MoE models")
    for key in ("hidden_size_per_layer_input", "num_kv_shared_layers", "use_double_wide_mlp",
                "use_bidirectional_attention"):
        if c.get(key):
            raise UnsupportedModelError(f"{path}: Gemma-4 with {key} = {c[key]!r} is not supported")
    layers, heads = int(need(c, path, "num_hidden_layers")), int(need(c, path, "num_attention_heads"))
    # as transformers' config: 5 sliding-window layers to 1 full when config.json leaves them out; the last full
    types: list[str] = list(c.get("layer_types") or
                            ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)])
    types[-1] = "full_attention"
    per = {int(k): v for k, v in (c.get("per_layer_config") or {}).items()}
    if not per:  # older configs: global_head_dim / num_global_key_value_heads for full-attention layers
        glob = {"head_dim": c.get("global_head_dim", 512)}
        if c.get("num_global_key_value_heads") and c.get("attention_k_eq_v"):
            glob["num_key_value_heads"] = c["num_global_key_value_heads"]
        per = {i: glob for i, t in enumerate(types) if t == "full_attention"}
    specs = [GemmaAttentionSpec(num_heads=heads, head_dim=int(per.get(i, {}).get("head_dim", c["head_dim"])),
                                num_kv_heads=int(per.get(i, {}).get("num_key_value_heads", c["num_key_value_heads"])),
                                k_eq_v=bool(c.get("attention_k_eq_v")) and t == "full_attention",
                                bias=bool(c.get("attention_bias", False))) for i, t in enumerate(types)]
    head_dims = {t: specs[types.index(t)].head_dim for t in set(types)}
    ropes = {t: (_inv_freq(c["rope_parameters"][t], d), 1.0) for t, d in head_dims.items()}
    first = specs[0]
    flat = {**c, "num_experts_per_tok": c.get("top_k_experts"), "rope_parameters": c["rope_parameters"][types[0]]}
    return common_args(
        flat, path, num_experts=int(need(c, path, "num_experts")),
        moe_intermediate_size=int(need(c, path, "moe_intermediate_size")), attention=first,
        router=ScaledSoftmaxTopK(eps=float(c.get("rms_norm_eps", 1e-6))),
        dense_intermediate_size=int(need(c, path, "intermediate_size")), layer_types=types, layer_attention=specs,
        rope_by_type=ropes, embed_scale=float(c["hidden_size"]) ** 0.5,
        final_logit_softcapping=c.get("final_logit_softcapping"), decoder=SandwichLayer,
        expert_activation=GEGLU)


GEGLU = ExpertActivation("gelu_tanh")  # down(gelu_tanh(gate x) * up x), no biases
TEXT = Family(model_type="gemma4_text", args=args, expert_keys=EXPERT_KEYS, fused=FUSED_GEMMA, renames=RENAMES)
LM = "model.language_model."
FAMILY = Family(model_type="gemma4", args=args, expert_keys=tuple(k.replace("model.", LM, 1) for k in EXPERT_KEYS),
                fused=tuple(k.replace("model.", LM, 1) for k in FUSED_GEMMA),
                renames=((r"^model\.language_model\.", "model."), *RENAMES))
