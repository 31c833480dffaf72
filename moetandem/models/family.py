"""What a family module declares, and the config.json fields all families share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moetandem.errors import UnsupportedModelError
from moetandem.models.transformer import ArchArgs


@dataclass(frozen=True)
class Family:
    model_type: str
    args: Callable[[dict[str, Any], Path], ArchArgs]
    #: hub names of one expert's matrices ({l} layer, {e} expert): gate [I, H], up [I, H], down [H, I]
    expert_keys: tuple[str, str, str]
    #: hub name prefix of a layer's MoE block; our parameter tree calls it "mlp"
    moe_prefix: str = "model.layers.{l}.mlp"

    def rename(self, hub_name: str) -> str:
        """Hub tensor name -> our parameter name (non-expert tensors only)."""
        head, _, tail = self.moe_prefix.partition("{l}")
        if hub_name.startswith(head) and tail != ".mlp":
            layer, sep, rest = hub_name[len(head):].partition(tail)
            if sep and layer.isdigit():
                return f"{head}{layer}.mlp{rest}"
        return hub_name

    def fused_keys(self, layer: int | str) -> tuple[str, str]:
        """transformers 5 in-memory layout, if a checkpoint was saved fused: gate_up [E, 2I, H], down [E, H, I]."""
        p = self.moe_prefix.format(l=layer)
        return f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"


def _rope(c: dict[str, Any], path: Path, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    params.setdefault("rope_theta", c.get("rope_theta", 10000.0))
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
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](AutoConfig.from_pretrained(str(path)), torch.device("cpu"))
    return inv_freq, float(scaling)


def need(c: dict[str, Any], path: Path, *keys: str) -> Any:
    """The first of `keys` present in config.json (field names drift between transformers versions)."""
    for key in keys:
        if c.get(key) is not None:
            if not isinstance(c[key], (int, float, list, bool)):
                raise UnsupportedModelError(f"{path / 'config.json'}: {key} = {c[key]!r} is not a number")
            return c[key]
    raise UnsupportedModelError(f"{path / 'config.json'} lacks {' / '.join(map(repr, keys))}")


def common_args(c: dict[str, Any], path: Path, *, num_experts: int, moe_intermediate_size: int,
                norm_topk_prob: bool, **extra: Any) -> ArchArgs:
    hidden, heads = int(need(c, path, "hidden_size")), int(need(c, path, "num_attention_heads"))
    head_dim = int(c.get("head_dim") or hidden // heads)
    layers = int(need(c, path, "num_hidden_layers"))
    inv_freq, scaling = _rope(c, path, head_dim)
    if "layer_types" in c and c["layer_types"]:
        windows = [c.get("sliding_window") if t == "sliding_attention" else None for t in c["layer_types"]]
    else:
        windows = [c.get("sliding_window") or None] * layers
    eos = c.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ArchArgs(
        vocab_size=int(need(c, path, "vocab_size")), hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        num_experts=num_experts, top_k=int(need(c, path, "num_experts_per_tok")),
        moe_intermediate_size=moe_intermediate_size, norm_topk_prob=norm_topk_prob,
        inv_freq=inv_freq, rope_scaling=scaling, tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        sliding_windows=windows, eos_token_ids=eos_ids, **extra)


def sparse_layers(c: dict[str, Any], layers: int) -> list[bool]:
    """Qwen-style decoder_sparse_step / mlp_only_layers."""
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or [])
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]
