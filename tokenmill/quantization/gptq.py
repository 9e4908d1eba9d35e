"""GPTQ: one-shot weight quantization with second-order error compensation.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (2022). For a Linear layer W (N, K) and calibration inputs X (n, K) it
minimises ||X W^T - X Q^T||^2 column by column: each column is rounded onto the grid and
its rounding error, scaled by the inverse Hessian H^-1 = (2 X^T X / n + damping)^-1, is
pushed onto the not-yet-quantized columns. Following the reference implementation
(IST-DASLab gptq.py, as used by AutoGPTQ / GPTQModel) the updates inside a block of
``block_size`` columns are applied eagerly and the rest lazily, once per block, and the
rows of H^-1 come from the upper Cholesky factor of H^-1.

One deliberate difference: at a group boundary the grid is fitted to the group's current
weights, i.e. including the error compensation from the earlier columns of the same block
(the reference reads the block-stale copy). Those are the values that actually get rounded.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch import Tensor

from tokenmill.quantization.packing import check_bits
from tokenmill.quantization.rtn import QuantResult, _check_group_size, dequant, quant_grid, quantize_with

logger = logging.getLogger(__name__)


def relative_output_error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """||x w^T - x w_hat^T|| / ||x w^T|| for inputs x (n, K) and weights (N, K)."""
    x = x.reshape(-1, x.shape[-1]).float()
    ref = x @ w.float().t()  # (n, N)
    return float(torch.linalg.norm(ref - x @ w_hat.float().t()) / torch.linalg.norm(ref))


def _upper_cholesky_of_inverse(H: Tensor, damp_percent: float) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping on failure."""
    mean_diag = torch.diag(H).mean()
    damp = damp_percent
    for _ in range(6):
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
        logger.warning("GPTQ: Hessian not positive definite with damp_percent=%g, retrying with %g",
                       damp, damp * 10)
        damp *= 10
    raise ValueError("GPTQ: the Hessian is not positive definite even with heavy damping; "
                     "check the calibration inputs for NaN/inf")


class GPTQ:
    """Accumulates the Hessian of one Linear layer and quantizes its weight.

    gptq = GPTQ(linear.weight)        # (N, K)
    for x in calibration_inputs:      # (..., K), the inputs the layer sees
        gptq.add_batch(x)
    result = gptq.quantize(bits=4, group_size=128)
    """

    def __init__(self, weight: Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out_features, in_features), got {tuple(weight.shape)}")
        self.weight = weight.detach().to(torch.float32).clone()  # (N, K)
        self.rows, self.columns = self.weight.shape
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=weight.device)
        self.nsamples = 0
        self.Q: Optional[Tensor] = None  # (N, K) float32 weights of the last quantize() call

    def add_batch(self, inp: Tensor) -> None:
        """Add calibration inputs (..., K): H becomes 2 X^T X / n over all n rows seen so far."""
        if inp.shape[-1] != self.columns:
            raise ValueError(f"inputs must end in {self.columns} features, got {tuple(inp.shape)}")
        x = inp.detach().reshape(-1, self.columns).to(device=self.H.device, dtype=torch.float32)  # (n, K)
        n = x.shape[0]
        if n == 0:
            return
        # running average, so H keeps a sane magnitude however many batches arrive
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * math.sqrt(2 / self.nsamples)
        self.H += x.t() @ x  # (K, K)

    def quantize(self, bits: int = 4, group_size: int = 128, sym: bool = True, desc_act: bool = False,
                 static_groups: bool = False, damp_percent: float = 0.01,
                 block_size: int = 128) -> QuantResult:
        """Quantize the weight; the result is in the original column order (see QuantResult)."""
        check_bits(bits)
        _check_group_size(group_size)
        if not 0 < damp_percent < 1:
            raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize() needs calibration data: call add_batch() first")
        N, K = self.rows, self.columns
        g = K if group_size == -1 else group_size
        W = self.weight.clone()  # (N, K)
        H = self.H.clone()  # (K, K); cloned so quantize() can be called again with other settings

        # inputs that are always zero carry no information: any value works, 0 is cheapest
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        static: Optional[list[tuple[Tensor, Tensor]]] = None
        if static_groups:
            # grids fixed up front on the natural column order, so groups stay contiguous
            # input ranges and g_idx stays k // g even with act-order
            static = [quant_grid(W[:, s:s + g], bits, sym) for s in range(0, K, g)]

        perm: Optional[Tensor] = None
        if desc_act:
            # quantize the columns with the largest input energy first, while most
            # columns are still free to absorb their error
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        Hinv = _upper_cholesky_of_inverse(H, damp_percent)  # (K, K) upper triangular
        del H

        Q = torch.zeros_like(W)  # (N, K) in processing order
        qint = torch.zeros(N, K, dtype=torch.int32, device=W.device)
        losses = torch.zeros_like(W)
        scales: list[Tensor] = []
        zeros: list[Tensor] = []
        scale = zero = torch.empty(0)
        if static is None and group_size == -1:
            scale, zero = quant_grid(W, bits, sym)
            scales, zeros = [scale], [zero]

        for i1 in range(0, K, block_size):
            i2 = min(i1 + block_size, K)
            W1 = W[:, i1:i2].clone()  # (N, B), receives the eager in-block updates
            Err1 = torch.zeros_like(W1)  # (N, B)
            Hinv1 = Hinv[i1:i2, i1:i2]  # (B, B)
            for i in range(i2 - i1):
                col = i1 + i
                if static is not None:
                    src = int(perm[col]) if perm is not None else col
                    scale, zero = static[src // g]
                elif group_size != -1 and col % g == 0:
                    # current weights of the group: in-block columns from W1, any columns past
                    # the block from W (they have every update but this block's)
                    cols = torch.cat([W1[:, i:i + g], W[:, i2:col + g]], dim=1)
                    scale, zero = quant_grid(cols, bits, sym)
                    scales.append(scale)
                    zeros.append(zero)
                w = W1[:, i]  # (N,)
                d = Hinv1[i, i]
                qc = quantize_with(w[:, None], scale, zero, bits)  # (N, 1)
                q = dequant(qc, scale, zero)[:, 0]  # (N,)
                qint[:, col] = qc[:, 0]
                Q[:, col] = q
                err = (w - q) / d  # (N,)
                losses[:, col] = err**2 / 2
                W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy batch update of the remaining columns

        if static is not None:
            scales = [s for s, _ in static]
            zeros = [z for _, z in static]
        if perm is not None:
            invperm = torch.argsort(perm)
            Q, qint = Q[:, invperm], qint[:, invperm]
        if static is not None or perm is None:
            g_idx = torch.arange(K, device=W.device) // g
        else:
            # grids were fitted in processing order: column perm[j] belongs to group j // g
            g_idx = torch.empty(K, dtype=torch.int64, device=W.device)
            g_idx[perm] = torch.arange(K, device=W.device) // g

        self.Q = Q
        loss = float(losses.sum())
        logger.debug("gptq: %dx%d, %d bits, group %d, desc_act=%s, loss %.4g", N, K, bits, group_size,
                     desc_act, loss)
        return QuantResult(
            intweight=qint,
            scales=torch.stack(scales),  # (G, N)
            zeros=torch.stack(zeros).to(torch.int32),  # (G, N)
            g_idx=g_idx.to(torch.int32),
            bits=bits, group_size=group_size, sym=sym, perm=perm, loss=loss)
