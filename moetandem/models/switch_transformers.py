"""Switch Transformers (google/switch-base-8 ... -256, switch-large-128, switch-c-2048): a T5-style encoder-decoder
(models/seq2seq.py) whose feed-forward is a top-1 MoE of plain ReLU experts (wi, wo) every `encoder_sparse_step` /
`decoder_sparse_step` blocks, with per-sequence expert capacity; relative position bias, embeddings shared by both
stacks and the (tied, rescaled) output projection."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from moetandem.errors import UnsupportedModelError
from moetandem.models.family import Family, need, reject_quantized
from moetandem.models.seq2seq import Seq2SeqArgs, Seq2SeqLM


def sparse_blocks(layers: int, step: int) -> list[bool]:
    """Which blocks are MoE, exactly as transformers decides it (step 1: all; else block i with i % step == 1)."""
    return [step > 0 and (step == 1 or i % step == 1) for i in range(layers)]


def _step(c: dict[str, Any], layers: int, which: str) -> int:
    if c.get(f"{which}_sparse_step") is not None:
        return int(c[f"{which}_sparse_step"])
    n = int(c.get(f"num_sparse_{which}_layers", 3))
    return layers // n if n > 0 else layers


def args(c: dict[str, Any], path: Path) -> Seq2SeqArgs:
    reject_quantized(c, path)
    act = c.get("dense_act_fn", c.get("feed_forward_proj", "relu"))
    if act != "relu":
        raise UnsupportedModelError(f"{path / 'config.json'}: dense_act_fn {act!r}; moetandem runs the ReLU Switch "
                                    "Transformers (the released google/switch-* checkpoints)")
    enc = int(need(c, path, "num_layers"))
    dec = int(c.get("num_decoder_layers") or enc)
    eos = c.get("eos_token_id")
    pad = int(c.get("pad_token_id") or 0)
    start = c.get("decoder_start_token_id")
    d_ff = int(need(c, path, "d_ff"))
    return Seq2SeqArgs(
        vocab_size=int(need(c, path, "vocab_size")), hidden_size=int(need(c, path, "d_model")),
        num_heads=int(need(c, path, "num_heads")), head_dim=int(need(c, path, "d_kv")), dense_intermediate_size=d_ff,
        num_experts=int(need(c, path, "num_experts")), moe_intermediate_size=d_ff,
        expert_capacity=int(need(c, path, "expert_capacity")),
        encoder_sparse=sparse_blocks(enc, _step(c, enc, "encoder")),
        decoder_sparse=sparse_blocks(dec, _step(c, dec, "decoder")),
        num_buckets=int(c.get("relative_attention_num_buckets", 32)),
        max_distance=int(c.get("relative_attention_max_distance", 128)), eps=float(c.get("layer_norm_epsilon", 1e-6)),
        router_bias=bool(c.get("router_bias", False)), tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
        eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos), pad_token_id=pad,
        decoder_start_token_id=pad if start is None else int(start))


FAMILY = Family(
    model_type="switch_transformers",
    args=args,  # type: ignore[arg-type]
    expert_keys=("{l}.mlp.experts.expert_{e}.wi.weight", "{l}.mlp.experts.expert_{e}.wo.weight"),
    fused=(),
    renames=((r"^(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.",
              r"\1.rel_bias.relative_attention_bias."),
             (r"\.mlp\.router\.classifier\.", ".mlp.gate.")),
    model=Seq2SeqLM,
    seq2seq=True,
)
