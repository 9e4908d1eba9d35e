"""The uniform quantization grid shared by RTN and GPTQ, and round-to-nearest quantization.

The grid follows GPTQ's ``Quantizer.find_params`` (perchannel=True, weight=True) so that
RTN is the honest baseline for GPTQ and both write the same checkpoint format:
one (scale, zero) per output row and per group of ``group_size`` input columns, with
integer zero points and q = clamp(round(w / scale) + zero, 0, 2^b - 1).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tokenmill.quantization.packing import check_bits, default_g_idx, pack_gptq

logger = logging.getLogger(__name__)


@dataclass
class QuantResult:
    """A quantized Linear weight, in the original input-column order.

    intweight: (N, K) int32 in [0, 2^bits)
    scales:    (G, N) float32
    zeros:     (G, N) int32 in [0, 2^bits)
    g_idx:     (K,)   int32, group of each input column
    perm:      (K,)   int64 act-order column permutation (GPTQ with desc_act), else None
    loss:      GPTQ's sum of per-column losses (w - q)^2 / (2 d^2), else None
    """

    intweight: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    group_size: int
    sym: bool
    perm: Optional[Tensor] = None
    loss: Optional[float] = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W (N, K) = scales[g_idx[k], n] * (q[n, k] - zeros[g_idx[k], n]), computed in float32."""
        g = self.g_idx.long()
        s = self.scales.float()[g].t()  # (N, K)
        z = self.zeros.float()[g].t()  # (N, K)
        # same expression and operand order as dequant(), so GPTQ's Q is reproduced bit for bit
        return (s * (self.intweight.float() - z)).to(dtype)

    def pack(self) -> dict[str, Tensor]:
        """The GPTQ v1 checkpoint tensors: qweight, qzeros, scales (fp16), g_idx."""
        return pack_gptq(self.intweight, self.zeros, self.scales, self.g_idx, self.bits)


def _check_group_size(group_size: int) -> None:
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1, got {group_size}")


def quant_grid(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Per-row min-max grid for w (N, k) -> (scale (N,), zero (N,)), both float32.

    The range always includes 0 so that 0 is representable. With sym the zero point is
    fixed at 2^(bits-1) (GPTQ's (maxq + 1) / 2); note that, as in GPTQ, an all-positive
    row then only uses the upper half of the grid.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"quant_grid expects a 2-D tensor (rows, columns), got {tuple(w.shape)}")
    maxq = 2**bits - 1
    w = w.float()
    zero_ = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_)
    xmax = torch.maximum(w.max(dim=1).values, zero_)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    # all-zero rows: any non-degenerate grid works, pick GPTQ's [-1, 1]
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes for w (N, k) on the grid (scale (N,), zero (N,)) -> int32 (N, k)."""
    maxq = 2**bits - 1
    q = torch.clamp(torch.round(w.float() / scale[:, None]) + zero[:, None], 0, maxq)
    return q.to(torch.int32)


def dequant(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Float32 values of codes q (N, k) on the grid (scale (N,), zero (N,))."""
    return scale[:, None] * (q.float() - zero[:, None])


def rtn_quantize(weight: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True) -> QuantResult:
    """Round-to-nearest quantization of a Linear weight (N, K), one grid per row and group."""
    check_bits(bits)
    _check_group_size(group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {tuple(weight.shape)}")
    N, K = weight.shape
    g = K if group_size == -1 else group_size
    w = weight.float()
    intweight = torch.empty(N, K, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    for start in range(0, K, g):
        cols = w[:, start:start + g]  # (N, g)
        scale, zero = quant_grid(cols, bits, sym)
        intweight[:, start:start + g] = quantize_with(cols, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    logger.debug("rtn: %dx%d, %d bits, %d groups", N, K, bits, math.ceil(K / g))
    return QuantResult(
        intweight=intweight,
        scales=torch.stack(scales),  # (G, N)
        zeros=torch.stack(zeros).to(torch.int32),  # (G, N)
        g_idx=default_g_idx(K, g, device=w.device),
        bits=bits, group_size=group_size, sym=sym)
