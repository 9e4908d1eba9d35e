"""W4A16 (and 2/3/8-bit) linears in the GPTQ v1 format: weights stay packed in memory and are
dequantized inside the layer's matmul, gpt-fast style (the forward is a reshape around one kernel).

On CPU (and as the fallback everywhere) the kernel is torch: unpack, scale, matmul. The packed
tensors keep the checkpoint's names (qweight, qzeros, scales, g_idx), so loading is a plain copy.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quantization.packing import dequantize_gptq, pack_rows, unpack_cols, unpack_rows


class GPTQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int) -> None:
        super().__init__()
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"a {bits}-bit GPTQ layer needs in/out features whose bit count is a multiple of "
                             f"32; got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size if group_size != -1 else in_features
        groups = math.ceil(in_features / self.group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._fast: Optional[dict[str, torch.Tensor]] = None  # built on first use, after loading

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                               self.in_features, self.out_features, dtype)  # (N, K)

    def _prepare_fast_path(self) -> Optional[dict[str, torch.Tensor]]:
        """For 2/4/8 bits with whole groups: rows sorted by group (act-order rows are permuted
        once here, and the input is permuted to match at run time, as exllama does), so the
        dequantization is a reshape and two broadcasts instead of per-row gathers."""
        K, N, g = self.in_features, self.out_features, self.group_size
        if self.bits == 3 or K % g:
            return None
        g_idx = self.g_idx.long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K, device=g_idx.device) // g):
            return None  # groups of unequal sizes: keep the general path
        fast: dict[str, torch.Tensor] = {}
        qweight = self.qweight
        if not torch.equal(perm, torch.arange(K, device=perm.device)):
            qweight = pack_rows(unpack_rows(self.qweight, self.bits, K)[perm], self.bits)
            fast["perm"] = perm
        per_word = 32 // self.bits
        fast["qweight"] = qweight.view(K // per_word, 1, N)
        fast["shifts"] = (torch.arange(per_word, device=qweight.device, dtype=torch.int32) * self.bits).view(1, -1, 1)
        fast["zeros"] = (unpack_cols(self.qzeros, self.bits, N) + 1).to(torch.float32)[:, None, :]  # v1: stored - 1
        fast["scales"] = self.scales.to(torch.float32)[:, None, :]  # (G, 1, N)
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast is None:
            self._fast = self._prepare_fast_path() or {}
        f = self._fast
        if not f:
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)
        K, N = self.in_features, self.out_features
        # An arithmetic shift then a mask narrower than the shift leaves exactly the packed bits.
        q = (f["qweight"] >> f["shifts"]) & ((1 << self.bits) - 1)  # (K / per_word, per_word, N)
        w = ((q.view(-1, self.group_size, N).to(torch.float32) - f["zeros"]) * f["scales"]).view(K, N)
        if "perm" in f:
            x = x.index_select(-1, f["perm"])
        out = torch.matmul(x, w.to(x.dtype))
        return out + self.bias if self.bias is not None else out


class GPTQMergedLinear(nn.Module):
    """The quantized counterpart of MergedLinear: one GPTQ layer per checkpoint projection.

    The pieces cannot be concatenated into one packed matrix: with act-order each has its own
    g_idx, so each is dequantized and applied on its own and the outputs are concatenated.
    """

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], int], bias: bool, bits: int,
                 group_size: int) -> None:
        super().__init__()
        self.shards = nn.ModuleDict({str(k): GPTQLinear(in_features, n, bias, bits, group_size)
                                     for k, n in shard_sizes.items()})
        self.shard_names = [str(k) for k in shard_sizes]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.shards.values()], dim=-1)

    def load_shard(self, leaf: str, loaded: torch.Tensor, shard_id: Union[str, int], presharded: bool = False) -> None:
        target: Optional[torch.Tensor] = getattr(self.shards[str(shard_id)], leaf, None)
        if target is None:
            raise ValueError(f"quantized shard {shard_id!r} has no tensor {leaf!r}")
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard_id!r} {leaf}: checkpoint shape {tuple(loaded.shape)}, "
                             f"expected {tuple(target.shape)}")
        target.data.copy_(loaded)

    def checkpoint_leaves(self) -> list[str]:
        first = next(iter(self.shards.values()))
        return ["qweight", "qzeros", "scales", "g_idx"] + (["bias"] if first.bias is not None else [])
