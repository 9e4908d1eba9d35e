"""RMSNorm, computed in float32 like the reference implementation."""
from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels import cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_ops.usable(x) and self.weight.dtype == torch.float32:  # one fused call, not six ATen ops
            return torch.ops.tokenmill_cpu.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
