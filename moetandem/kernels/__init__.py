"""Device kernels: the fused MoE and decode attention over the KV cache (Triton on CUDA, a PyTorch reference
elsewhere), also as the custom ops torch.ops.moetandem.fused_moe (and fused_moe_parts: per assignment, the sum over k
left to the caller) and torch.ops.moetandem.decode_attention."""
from moetandem.kernels.decode_attention import (decode_attention, decode_attention_op, decode_attention_reference,
                                                decode_attention_supported)
from moetandem.kernels.fused_moe import fused_moe, fused_moe_parts, fused_moe_reference, fused_moe_supported
from moetandem.kernels.reference import ACTIVATIONS, fused_moe_reference_parts
from moetandem.kernels.ops import fused_moe_op, fused_moe_parts_op

__all__ = ["ACTIVATIONS", "decode_attention", "decode_attention_op", "decode_attention_reference",
           "decode_attention_supported", "fused_moe", "fused_moe_op", "fused_moe_parts", "fused_moe_parts_op",
           "fused_moe_reference", "fused_moe_reference_parts", "fused_moe_supported"]
