"""nn.Linear whose forward takes the tuned decode GEMV (kernels/linear.py) at decode sizes on CUDA and is
F.linear everywhere else: same parameters and state-dict names, so checkpoints load as into nn.Linear."""
from __future__ import annotations

import torch
from torch import nn

from moetandem.kernels.linear import decode_linear


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(x, self.weight, self.bias)  # [..., out_features]
