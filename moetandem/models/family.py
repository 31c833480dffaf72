"""What a family module declares (its components, read from config.json into ArchArgs, and its tensor-name
table), and the config.json fields all families share."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from moetandem.errors import UnsupportedModelError
from moetandem.models.components import AttentionSpec, GQASpec, RouterSpec
from moetandem.models.transformer import ArchArgs
from moetandem.quantization import scheme

FUSED = ("model.layers.{l}.mlp.experts.gate_up_proj", "model.layers.{l}.mlp.experts.down_proj")


@dataclass(frozen=True)
class Family:
    """One architecture, picked by config.json "model_type" (or one of `aliases`). The tensor-name table:
    `expert_keys` / `fused` name the routed experts (read by the ExpertStore, never loaded as parameters);
    `renames` are (regex, replacement) pairs, applied in order, that turn every other hub name into our parameter
    name (mlx-lm's `sanitize`); hub tensors that match no parameter after renaming are ignored (MTP layers,
    rotary buffers)."""

    model_type: str
    args: Callable[[dict[str, Any], Path], ArchArgs]
    #: hub names of one expert's matrices ({l} layer, {e} expert): gate [I, H], up [I, H], down [H, I]
    expert_keys: tuple[str, ...]
    #: transformers 5 in-memory layout, if a checkpoint was saved fused: gate_up [E, 2I, H], down [E, H, I]
    fused: tuple[str, ...] = FUSED
    renames: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    #: how `expert_keys` store the routed experts: "linear" (per expert gate/up [I, H], down [H, I], or `fused`),
    #: "gpt_oss" (all experts in one tensor per layer, gate_up [E, H, 2I] with gate/up interleaved, down [E, I, H],
    #: biases; or MXFP4 *_blocks / *_scales)
    expert_layout: str = "linear"
    #: None when the expert providers run this family's routed experts; else why they cannot yet
    experts_unsupported: str | None = None
    #: the model class built from `args(...)` (default: the decoder-only MoEForCausalLM)
    model: Callable[[Any], Any] | None = None
    #: an encoder-decoder (text-to-text): generated and evaluated by moetandem.text2text, not the batcher
    seq2seq: bool = False
    model_types: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_types", (self.model_type, *self.aliases))

    @cached_property
    def _renames(self) -> list[tuple[re.Pattern[str], str]]:
        return [(re.compile(p), r) for p, r in self.renames]

    def rename(self, hub_name: str) -> str:
        """Hub tensor name -> our parameter name (non-expert tensors only)."""
        for pattern, repl in self._renames:
            hub_name = pattern.sub(repl, hub_name)
        return hub_name

    def fused_keys(self, layer: int | str) -> tuple[str, ...]:
        return tuple(k.format(l=layer) for k in self.fused)


def _rope(c: dict[str, Any], path: Path, head_dim: int, hf_type: str | None) -> tuple[torch.Tensor, float]:
    params = rope_params(c)
    kind = params.get("rope_type") or params.get("type") or "default"
    dim = int(head_dim * float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))))
    if kind == "default":
        base = float(params["rope_theta"])
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    if kind == "dynamic":
        raise UnsupportedModelError("dynamic RoPE scaling is not supported; use a checkpoint with static scaling")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModelError(f"unknown rope_type {kind!r} in {path / 'config.json'}")
    if hf_type is None:
        cfg = AutoConfig.from_pretrained(str(path))
    else:  # a model_type transformers has no class for (kimi_k2): read config.json as its base architecture
        cfg = AutoConfig.for_model(hf_type, **{k: v for k, v in c.items() if k not in ("model_type", "auto_map")})
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))
    return inv_freq, float(scaling)


def rope_params(c: dict[str, Any]) -> dict[str, Any]:
    """RoPE parameters whichever way config.json spells them (rope_parameters, or legacy rope_scaling)."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    return params


def need(c: dict[str, Any], path: Path, *keys: str) -> Any:
    """The first of `keys` present in config.json (field names drift between transformers versions)."""
    for key in keys:
        if c.get(key) is not None:
            if not isinstance(c[key], (int, float, list, bool)):
                raise UnsupportedModelError(f"{path / 'config.json'}: {key} = {c[key]!r} is not a number")
            return c[key]
    raise UnsupportedModelError(f"{path / 'config.json'} lacks {' / '.join(map(repr, keys))}")


def gqa(c: dict[str, Any], path: Path, **variant: Any) -> GQASpec:
    """Grouped-query attention sized from config.json; `variant`: GQASpec's flags (biases, qk_norm, sinks...)."""
    hidden, heads = int(need(c, path, "hidden_size")), int(need(c, path, "num_attention_heads"))
    return GQASpec(num_heads=heads, num_kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or hidden // heads), **variant)


def common_args(c: dict[str, Any], path: Path, *, num_experts: int, moe_intermediate_size: int, router: RouterSpec,
                attention: AttentionSpec | None = None, hf_type: str | None = None, **extra: Any) -> ArchArgs:
    """ArchArgs from the fields every family shares; attention defaults to plain GQA."""
    attention = attention or gqa(c, path)
    layers = int(need(c, path, "num_hidden_layers"))
    inv_freq, scaling = _rope(c, path, attention.rope_dim, hf_type)
    if "layer_types" in c and c["layer_types"]:
        windows = [c.get("sliding_window") if t == "sliding_attention" else None for t in c["layer_types"]]
    else:
        windows = [c.get("sliding_window") or None] * layers
    eos = c.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ArchArgs(
        vocab_size=int(need(c, path, "vocab_size")), hidden_size=int(need(c, path, "hidden_size")), num_layers=layers,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        num_experts=num_experts, top_k=int(need(c, path, "num_experts_per_tok")),
        moe_intermediate_size=moe_intermediate_size, attention=attention, router=router,
        inv_freq=inv_freq, rope_scaling=scaling, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_windows=windows, eos_token_ids=eos_ids, **extra)


def sparse_layers(c: dict[str, Any], layers: int) -> list[bool]:
    """Qwen-style decoder_sparse_step / mlp_only_layers."""
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def first_dense_layers(c: dict[str, Any], layers: int) -> list[bool]:
    """DeepSeek-style first_k_dense_replace (and moe_layer_freq): the first k layers are dense MLPs."""
    k, freq = int(c.get("first_k_dense_replace") or 0), int(c.get("moe_layer_freq") or 1)
    return [i >= k and i % freq == 0 for i in range(layers)]


def text_config(c: dict[str, Any]) -> dict[str, Any]:
    """The language model's config.json fields of a multimodal wrapper (Qwen3.5, Gemma-4), or c itself."""
    if not isinstance(c.get("text_config"), dict):
        return c
    return {k: v for k, v in c.items() if k in ("tie_word_embeddings", "eos_token_id")} | c["text_config"]


def reject_quantized(c: dict[str, Any], path: Path, allow: tuple[str, ...] = ("fp8", "int4")) -> None:
    """A quantized checkpoint this family cannot read is refused before any weight is: `allow` names the schemes
    (moetandem.quantization) its loader reads (gpt-oss: mxfp4; the linear-expert families: block FP8 and
    compressed-tensors W4A16); an unknown scheme is refused by quantization.scheme itself."""
    sch = scheme(c, path)
    if sch is not None and sch.method not in allow:
        where = "gpt-oss" if sch.method == "mxfp4" else "families with per-expert linear weights"
        raise UnsupportedModelError(f"{path} is quantized ({sch.method}), which moetandem reads only for {where}; "
                                    "use the checkpoint's bf16 release, or dequantize it first")
