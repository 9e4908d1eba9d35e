"""Linear layers split over tensor-parallel ranks (Megatron-LM's scheme, as vLLM and nano-vllm cut it).

- ColumnParallelLinear splits the output features: each rank computes its slice, no communication.
  Its output is made of parts (q/k/v, gate/up, or a single one), each split by units (heads, or
  features), so a rank holds matching slices of q, k and v. KV heads fewer than ranks are
  replicated: each rank holds the one head its query heads attend to.
- RowParallelLinear splits the input features: each rank multiplies its slice of the input (the
  column-parallel output it already holds) and an all-reduce sums the partial results.
- MergedLinear is a column-parallel layer whose parts come from separate checkpoint tensors
  (q_proj, k_proj, v_proj): fusing them saves kernel launches and reads the input once.

Every layer knows how to cut a full checkpoint tensor down to its rank's slice (`shard_tensor`);
the loader uses that, and so does `tokenmill convert`, which writes the slices ahead of time so a
rank can load its file as is (`presharded`). With one rank every cut is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_parallel_state, shard_range, tp_all_reduce
from tokenmill.kernels.linear import linear

ShardId = Optional[Union[str, int]]
Ranges = list[tuple[int, int]]  # (start, length) along the split dimension, concatenated in order


def take_ranges(t: torch.Tensor, dim: int, ranges: Ranges, unit: int = 1) -> torch.Tensor:
    """The concatenation of t's slices along dim; `unit` features share one element (packed ints)."""
    pieces = [t.narrow(dim, s // unit, n // unit) for s, n in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


@dataclass
class ShardSpec:
    """How one layer's checkpoint tensors are cut for this rank.

    kind "col" cuts output features, "row" input features. ranges maps a checkpoint shard id (None:
    the layer's whole tensor) to the feature ranges of that tensor this rank keeps.
    """

    kind: str
    ranges: dict[ShardId, Ranges]


def column_spec(parts: dict[ShardId, tuple[int, int]], what: str) -> tuple[ShardSpec, dict[ShardId, int]]:
    """parts: id -> (units, unit size) in full. Returns the spec and each part's local size."""
    s = get_parallel_state()
    ranges: dict[ShardId, Ranges] = {}
    whole: Ranges = []
    local: dict[ShardId, int] = {}
    offset = 0
    for pid, (units, unit_size) in parts.items():
        first, n = shard_range(units, s.tp_rank, s.tp_size, f"{what} {pid if pid is not None else ''}".strip())
        ranges[pid] = [(first * unit_size, n * unit_size)]
        whole.append((offset + first * unit_size, n * unit_size))
        local[pid] = n * unit_size
        offset += units * unit_size
    ranges[None] = whole
    return ShardSpec("col", ranges), local


def row_spec(in_features: int, what: str) -> tuple[ShardSpec, int]:
    s = get_parallel_state()
    if in_features % s.tp_size:
        raise ValueError(f"{what} input ({in_features}) does not split over tensor_parallel_size={s.tp_size}")
    n = in_features // s.tp_size
    return ShardSpec("row", {None: [(s.tp_rank * n, n)]}), n


class _ShardedLoad:
    """weight_loader/shard_tensor for float layers: weight is (out, in), bias (out)."""

    spec: ShardSpec
    checkpoint_transposed = False

    def shard_tensor(self, leaf: str, t: torch.Tensor, shard_id: ShardId = None) -> torch.Tensor:
        ranges = self.spec.ranges[shard_id]
        if self.spec.kind == "col":
            return take_ranges(t, 0, ranges)
        return take_ranges(t, 1, ranges) if leaf == "weight" else t

    def local_slot(self, leaf: str, shard_id: ShardId) -> torch.Tensor:
        return getattr(self, leaf).data

    def weight_loader(self, leaf: str, t: torch.Tensor, shard_id: ShardId = None, presharded: bool = False) -> None:
        target = getattr(self, leaf, None)
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"layer has no {leaf!r}")
        local = t if presharded else self.shard_tensor(leaf, t, shard_id)
        slot = self.local_slot(leaf, shard_id)
        if slot.shape != local.shape:
            raise ValueError(f"{leaf}{'' if shard_id is None else f' [{shard_id}]'}: checkpoint slice has shape "
                             f"{tuple(local.shape)}, the layer expects {tuple(slot.shape)}")
        slot.copy_(local)


class ColumnParallelLinear(_ShardedLoad, nn.Linear):
    def __init__(self, in_features: int, out_features: Union[int, dict[ShardId, tuple[int, int]]], bias: bool,
                 checkpoint_transposed: bool = False) -> None:
        parts = {None: (out_features, 1)} if isinstance(out_features, int) else out_features
        spec, local = column_spec(parts, "output features")
        super().__init__(in_features, sum(local.values()), bias=bias)
        self.spec = spec
        self.checkpoint_transposed = checkpoint_transposed
        self.part_slices: dict[ShardId, tuple[int, int]] = {}  # part -> (local offset, local size)
        offset = 0
        for pid, n in local.items():
            self.part_slices[pid] = (offset, n)
            offset += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x, self.weight, self.bias)

    def local_slot(self, leaf: str, shard_id: ShardId) -> torch.Tensor:
        data = getattr(self, leaf).data
        if shard_id is None:
            return data
        offset, n = self.part_slices[shard_id]
        return data[offset:offset + n]


class MergedLinear(ColumnParallelLinear):
    """Parts loaded from separate checkpoint tensors; `shard_sizes` maps part -> (units, unit size)."""

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], tuple[int, int]], bias: bool) -> None:
        super().__init__(in_features, dict(shard_sizes), bias)

    def load_shard(self, leaf: str, loaded: torch.Tensor, shard_id: Union[str, int], presharded: bool = False) -> None:
        if leaf not in ("weight", "bias") or getattr(self, leaf) is None:
            raise ValueError(f"merged linear has no {leaf!r} for shard {shard_id!r}")
        self.weight_loader(leaf, loaded, shard_id, presharded)

    @property
    def shard_names(self) -> list[Union[str, int]]:
        return list(self.part_slices)

    @property
    def shard_offsets(self) -> dict[Union[str, int], tuple[int, int]]:
        return self.part_slices

    def checkpoint_leaves(self) -> list[str]:
        return ["weight"] + (["bias"] if self.bias is not None else [])


class RowParallelLinear(_ShardedLoad, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, checkpoint_transposed: bool = False) -> None:
        spec, local_in = row_spec(in_features, "row-parallel layer")
        super().__init__(local_in, out_features, bias=bias)
        self.spec = spec
        self.checkpoint_transposed = checkpoint_transposed
        self.tp_size = get_parallel_state().tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return linear(self, x, self.weight, self.bias)
        out = tp_all_reduce(linear(self, x, self.weight))
        return out + self.bias if self.bias is not None else out  # the bias once, after the sum


def vocab_spec(vocab_size: int) -> tuple[ShardSpec, int, int]:
    """Vocabulary rows split evenly, the last rank's slice padded: (spec, first row, local rows)."""
    s = get_parallel_state()
    per_rank = -(-vocab_size // s.tp_size)
    first = min(s.tp_rank * per_rank, vocab_size)
    return ShardSpec("vocab", {None: [(first, min(per_rank, vocab_size - first))]}), first, per_rank


def _vocab_slice(spec: ShardSpec, t: torch.Tensor, rows: int) -> torch.Tensor:
    (first, n), = spec.ranges[None]
    out = t.narrow(0, first, n)
    if n < rows:  # padding rows: zero embeddings and zero logits, cut off after the gather
        out = torch.cat([out, out.new_zeros(rows - n, *t.shape[1:])])
    return out


class VocabParallelEmbedding(_ShardedLoad, nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        spec, first, rows = vocab_spec(num_embeddings)
        super().__init__(rows, embedding_dim)
        self.spec, self.vocab_start, self.vocab_size = spec, first, num_embeddings
        self.vocab_end = first + spec.ranges[None][0][1]
        self.tp_size = get_parallel_state().tp_size

    def shard_tensor(self, leaf: str, t: torch.Tensor, shard_id: ShardId = None) -> torch.Tensor:
        return _vocab_slice(self.spec, t, self.num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        # Each rank looks up the ids it owns, zeros for the others; the all-reduce fills them in.
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        out = F.embedding((ids - self.vocab_start) * mine, self.weight)
        return tp_all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(_ShardedLoad, nn.Linear):
    """The output head, split over the vocabulary like the embedding (so tying still works)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        spec, _, rows = vocab_spec(vocab_size)
        super().__init__(hidden_size, rows, bias=False)
        self.spec, self.vocab_size = spec, vocab_size

    def shard_tensor(self, leaf: str, t: torch.Tensor, shard_id: ShardId = None) -> torch.Tensor:
        return _vocab_slice(self.spec, t, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x, self.weight, self.bias)
