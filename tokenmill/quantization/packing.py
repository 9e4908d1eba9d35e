"""Bit packing for the GPTQ "v1" checkpoint format.

This is the layout AutoGPTQ / GPTQModel write (``checkpoint_format="gptq"``) and that
transformers, vLLM and exllama read. For a Linear layer with K = in_features,
N = out_features, b bits and G groups:

    qweight  int32   (K * b / 32, N)   integer weights q[k, n], packed along K
    qzeros   int32   (G, N * b / 32)   zero points minus one, packed along N
    scales   float16 (G, N)
    g_idx    int32   (K,)              group of each input channel

    W[n, k] = scales[g_idx[k], n] * (q[k, n] - (qzeros_unpacked[g_idx[k], n] + 1))

Bit layout. Along the packed dimension the b-bit values form one little-endian bit
stream: value j occupies stream bits [j*b, j*b + b), and stream bit p lives in word
p // 32 at bit p % 32. For b in {2, 4, 8} no value crosses a word (32/b values per
word). For b = 3, 32 values fill 3 words and two values straddle a boundary:

    word 0: values 0..9 at bits 3j, value 10 bits 0-1 at bits 30-31
    word 1: value 10 bit 2 at bit 0, values 11..20 at bits 3(j-11)+1, value 21 bit 0 at bit 31
    word 2: value 21 bits 1-2 at bits 0-1, values 22..31 at bits 3(j-22)+2

This is exactly AutoGPTQ's ``QuantLinear.pack`` (qlinear_cuda_old.py: ``intweight[i] << 30``
then ``(intweight[i] >> 2) & 1`` into the next row, and ``<< 31`` / ``(>> 1) & 0x3``) and
its torch dequantize fallback, which re-assembles values 10 and 21 from the neighbouring
words. Words are stored as int32, so a word with bit 31 set is negative.

The v1 zero point off-by-one: qzeros holds (zero - 1). A zero point of 0 therefore has
no honest encoding; we store (zero - 1) mod 2^b (all ones) and decode with the same
wrap-around, which round-trips, but kernels that decode without wrapping (exllama,
vLLM's gptq kernels) will read 2^b instead. ``pack_gptq`` logs a warning when that happens.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from tokenmill.quantization.config import SUPPORTED_BITS

logger = logging.getLogger(__name__)

_WORD_MASK = 0xFFFFFFFF


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest run of values that fills whole int32 words."""
    words = bits // math.gcd(bits, 32)  # 1 for 2/4/8 bits, 3 for 3 bits
    return 32 * words // bits, words


def _to_int32(words: Tensor) -> Tensor:
    # words hold unsigned 32-bit values in int64; reinterpret as two's-complement int32
    # (a plain .to(int32) of values >= 2^31 is not guaranteed to wrap).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Pack integer values (K, N) along K into int32 words (K * bits / 32, N)."""
    check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack_rows expects a 2-D tensor, got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_rows expects an integer tensor, got {q.dtype}")
    K, N = q.shape
    n_vals, n_words = _chunk(bits)
    if K % n_vals:
        raise ValueError(f"{bits}-bit packing needs the packed dimension to be a multiple "
                         f"of {n_vals}, got {K}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"values must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    vals = q.to(torch.int64).reshape(K // n_vals, n_vals, N)  # (chunks, n_vals, N)
    words = torch.zeros(K // n_vals, n_words, N, dtype=torch.int64, device=q.device)
    for j in range(n_vals):
        w, off = divmod(j * bits, 32)
        v = vals[:, j]  # (chunks, N)
        words[:, w] |= (v << off) & _WORD_MASK
        if off + bits > 32:  # 3-bit values 10 and 21 spill their high bits into the next word
            words[:, w + 1] |= v >> (32 - off)
    return _to_int32(words.reshape(K * bits // 32, N))


def unpack_rows(packed: Tensor, bits: int, K: int) -> Tensor:
    """Inverse of :func:`pack_rows`: int32 (K * bits / 32, N) -> int32 values (K, N)."""
    check_bits(bits)
    n_vals, n_words = _chunk(bits)
    if packed.dim() != 2 or K % n_vals or packed.shape[0] * 32 != K * bits:
        raise ValueError(f"cannot unpack {tuple(packed.shape)} into {K} rows of {bits} bits")
    N = packed.shape[1]
    # widen to int64 and drop the sign so right shifts are logical, not arithmetic
    words = (packed.to(torch.int64) & _WORD_MASK).reshape(K // n_vals, n_words, N)
    vals = torch.empty(K // n_vals, n_vals, N, dtype=torch.int64, device=packed.device)
    mask = 2**bits - 1
    for j in range(n_vals):
        w, off = divmod(j * bits, 32)
        v = words[:, w] >> off
        if off + bits > 32:
            v = v | (words[:, w + 1] << (32 - off))
        vals[:, j] = v & mask
    return vals.reshape(K, N).to(torch.int32)


def pack_cols(z: Tensor, bits: int) -> Tensor:
    """Pack integer values (G, N) along N into int32 words (G, N * bits / 32)."""
    if z.dim() != 2:
        raise ValueError(f"pack_cols expects a 2-D tensor, got shape {tuple(z.shape)}")
    return pack_rows(z.t(), bits).t().contiguous()


def unpack_cols(packed: Tensor, bits: int, N: int) -> Tensor:
    """Inverse of :func:`pack_cols`: int32 (G, N * bits / 32) -> int32 values (G, N)."""
    if packed.dim() != 2:
        raise ValueError(f"unpack_cols expects a 2-D tensor, got shape {tuple(packed.shape)}")
    return unpack_rows(packed.t(), bits, N).t().contiguous()


def default_g_idx(in_features: int, group_size: int, device: torch.device | str = "cpu") -> Tensor:
    """g_idx for natural column order: k // group_size (all zeros for group_size == -1)."""
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32, device=device)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def pack_gptq(intweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor,
              bits: int) -> dict[str, Tensor]:
    """Build v1 checkpoint tensors from integer weights (N, K), zeros (G, N), scales (G, N)."""
    check_bits(bits)
    if intweight.dim() != 2:
        raise ValueError(f"intweight must be (out_features, in_features), got {tuple(intweight.shape)}")
    N, K = intweight.shape
    if zeros.dim() != 2 or zeros.shape[1] != N or scales.shape != zeros.shape:
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must both be "
                         f"(groups, {N})")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    G = zeros.shape[0]
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(f"g_idx values must lie in [0, {G})")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) >= 2**bits):
        raise ValueError(f"zero points must lie in [0, {2**bits - 1}]")
    if zeros.numel() and bool((zeros == 0).any()):
        logger.warning("zero point 0 is stored as %d in the v1 format; kernels that do not wrap "
                       "around will decode it as %d", 2**bits - 1, 2**bits)
    # the v1 off-by-one: store zero - 1, wrapped into b bits
    stored = (zeros.to(torch.int64) - 1) & (2**bits - 1)
    return {
        "qweight": pack_rows(intweight.t(), bits),  # (K * b / 32, N)
        "qzeros": pack_cols(stored, bits),  # (G, N * b / 32)
        "scales": scales.to(torch.float16).contiguous(),  # (G, N)
        "g_idx": g_idx.to(torch.int32).contiguous(),  # (K,)
    }


def unpack_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                in_features: int, out_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Decode v1 tensors into (intweight (N, K), zeros (G, N), scales (G, N)), all int32 but scales."""
    check_bits(bits)
    K, N = in_features, out_features
    if scales.dim() != 2 or scales.shape[1] != N:
        raise ValueError(f"scales must be (groups, {N}), got {tuple(scales.shape)}")
    if qzeros.shape != (scales.shape[0], N * bits // 32):
        raise ValueError(f"qzeros must be ({scales.shape[0]}, {N * bits // 32}), got {tuple(qzeros.shape)}")
    if g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    if K and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0]):
        raise ValueError(f"g_idx values must lie in [0, {scales.shape[0]})")
    q = unpack_rows(qweight, bits, K)  # (K, N)
    zeros = (unpack_cols(qzeros, bits, N) + 1) & (2**bits - 1)  # undo the off-by-one, (G, N)
    return q.t().contiguous(), zeros, scales


def dequantize_gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int,
                    in_features: int, out_features: int,
                    dtype: torch.dtype = torch.float16) -> Tensor:
    """Dense weight (N, K) in Linear layout from v1 tensors; arithmetic is done in float32."""
    q, zeros, scales = unpack_gptq(qweight, qzeros, scales, g_idx, bits, in_features, out_features)
    g = g_idx.long()
    s = scales.float()[g]  # (K, N)
    z = zeros.float()[g]  # (K, N)
    w = s * (q.t().float() - z)  # (K, N)
    return w.t().contiguous().to(dtype)
