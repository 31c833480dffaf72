"""Device kernels: the fused MoE (Triton on CUDA, a PyTorch reference elsewhere), also as the custom op
torch.ops.moetandem.fused_moe."""
from moetandem.kernels.fused_moe import fused_moe, fused_moe_reference, fused_moe_supported
from moetandem.kernels.reference import ACTIVATIONS
from moetandem.kernels.ops import fused_moe_op

__all__ = ["ACTIVATIONS", "fused_moe", "fused_moe_op", "fused_moe_reference", "fused_moe_supported"]
