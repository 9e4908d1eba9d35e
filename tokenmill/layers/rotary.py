"""Rotary position embeddings (RoPE), with the "linear" and "llama3" scalings."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from tokenmill.kernels import cpu_ops
from tokenmill.layers.attention import step_cached


def rope_inv_freq(head_dim: int, base: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    """Inverse frequencies for the rotary dims, scaled as the checkpoint's rope_scaling says."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        # Positions divided by the factor is the same as frequencies divided by it.
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 scaling: Optional[dict[str, Any]], dtype: torch.dtype) -> None:
        super().__init__()
        self.head_dim, self.max_position, self.base, self.scaling = head_dim, max_position, base, scaling
        self.dtype = dtype
        self.init_buffers(torch.get_default_device())

    def init_buffers(self, device: torch.device) -> None:
        """(Re)compute the cos/sin tables; the loader calls this after building on meta."""
        inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling)
        t = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_pos, hd), the rotate-half layout
        # Computed in float32 and cast once, as transformers does per step.
        self.register_buffer("cos", emb.cos().to(device=device, dtype=self.dtype), persistent=False)
        # rotate_half(x) = cat(-x2, x1) = roll(x, half) * [-1.., +1..]: the sign lives in the table,
        # so a rotation is one roll and two multiplies (bitwise what transformers computes).
        sign = torch.cat([-torch.ones(self.head_dim // 2), torch.ones(self.head_dim // 2)])
        self.register_buffer("sin", (emb.sin() * sign).to(device=device, dtype=self.dtype), persistent=False)

    def rotate_(self, positions: torch.Tensor, rows: torch.Tensor, heads: int) -> bool:
        """Rotate the first `heads` heads of each row of rows [T, W] in place, in one fused call,
        where the CPU kernels serve it; False (nothing done) elsewhere."""
        if not (cpu_ops.usable(rows) and self.cos.dtype == torch.float32 and rows.stride(-1) == 1):
            return False
        torch.ops.tokenmill_cpu.rope_(rows, positions, self.cos, self.sin, heads, self.head_dim)
        return True

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, hd] (queries and keys together) rotated by their positions [T].

        The cos/sin rows of a step's positions are gathered once and shared by every layer.
        """
        key = ("rope", self.head_dim, self.base, repr(self.scaling), self.dtype)
        cos, sin = step_cached(key, lambda: (self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)))
        return x * cos + x.roll(self.head_dim // 2, dims=-1) * sin
