"""Linear layers whose weights may come from several checkpoint tensors.

Fusing q/k/v (and gate/up) into one matmul saves kernel launches and reads the input once; the
checkpoint keeps them apart, so a fused module has a `weight_loader` that copies one shard into
its slice of the weight (or bias).
"""
from __future__ import annotations

from typing import Union

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul computing several projections side by side along the output dimension."""

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[Union[str, int], tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: Union[str, int]) -> None:
        offset, size = self.shard_offsets[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id!r} has {loaded.shape[0]} rows, expected {size}")
        param.data[offset:offset + size].copy_(loaded)
