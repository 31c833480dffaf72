"""Device kernels: the fused MoE (Triton on CUDA, a PyTorch reference elsewhere)."""
from moetandem.kernels.fused_moe import fused_moe, fused_moe_reference, fused_moe_supported

__all__ = ["fused_moe", "fused_moe_reference", "fused_moe_supported"]
