"""W4A16 (and 2/3/8-bit) linears in the GPTQ v1 format: weights stay packed in memory and are
dequantized inside the layer's matmul, gpt-fast style (the forward is a reshape around one kernel).

For 2/4/8 bits with whole groups, on CPU, the forward is one call of tokenmill's packed kernel
(`kernels/cpu_gemv.cpp`), which reads the packed weights as they are (4-bit: an eighth of
float32's bytes) and unpacks them in registers. 3-bit, unequal groups and CUDA keep the torch
path: unpack, scale, matmul. The packed
tensors keep the checkpoint's names (qweight, qzeros, scales, g_idx), so loading is a plain copy.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import get_parallel_state, tp_all_reduce
from tokenmill.kernels import cpu_ops
from tokenmill.layers.linear import ShardSpec, take_ranges
from tokenmill.quantization.packing import dequantize_gptq, pack_rows, unpack_cols, unpack_rows


logger = logging.getLogger(__name__)



def _packed_kernel(x: torch.Tensor, fast: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """x @ W for packed W (`fast`'s kernel_* operands, rows sorted by group): one kernel call."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if "perm" in fast:  # act-order: the input follows the rows' sorted order
        x2 = x2.index_select(-1, fast["perm"])
    out = torch.ops.tokenmill_cpu.gptq_gemv(x2.float(), fast["kernel_qweight"], fast["kernel_scales"],
                                             fast["kernel_zeros"], bits, group_size)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


class GPTQLinear(nn.Module):
    """A GPTQ linear, possibly one tensor-parallel rank's slice of it (`spec`, from the float layer
    it replaces): column slices cut the packed output columns; row slices cut the input rows on
    group boundaries, or, with act-order (whose groups are scattered over the rows), keep every
    group's scales and zeros and cut only qweight and g_idx."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
                 spec: Optional[ShardSpec] = None, act_order: bool = False) -> None:
        super().__init__()
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"a {bits}-bit GPTQ layer needs in/out features whose bit count is a multiple of "
                             f"32; got {in_features} x {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        tp = get_parallel_state().tp_size
        self.spec = spec if spec is not None and spec.kind in ("col", "row") and tp > 1 else None
        if self.spec is not None and bits == 3:
            raise ValueError("3-bit GPTQ packs 32 values across 3 words and cannot be split over tensor-parallel "
                             "ranks; use 2, 4 or 8 bits")
        full_in = in_features * tp if self.spec is not None and self.spec.kind == "row" else in_features
        self.group_size = group_size if group_size != -1 else full_in
        groups = math.ceil(in_features / self.group_size)
        self.full_groups = False  # row slice keeping every group (act-order)
        self.tp_size = tp if self.spec is not None and self.spec.kind == "row" else 1
        if self.spec is not None:
            per_word = 32 // bits
            if self.spec.kind == "col" and any(s % per_word or n % per_word for s, n in self.spec.ranges[None]):
                raise ValueError(f"GPTQ layer of {out_features} output features per rank: each rank's columns must "
                                 f"start and end on a multiple of {per_word} (packed zeros)")
            if self.spec.kind == "row":
                if act_order or group_size == -1:  # groups scattered over (or spanning) the rows
                    groups, self.full_groups = math.ceil(full_in / self.group_size), True
                elif in_features % self.group_size:
                    raise ValueError(f"GPTQ row-parallel layer: {in_features} input rows per rank is not a whole "
                                     f"number of groups of {self.group_size}; tensor-parallel shards must fall on "
                                     "group boundaries")
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._fast: Optional[dict[str, torch.Tensor]] = None  # built on first use, after loading

    def shard_tensor(self, leaf: str, t: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        """This rank's slice of a full checkpoint tensor."""
        if self.spec is None:
            return t
        ranges = self.spec.ranges[None]
        if self.spec.kind == "col":
            dims = {"qweight": (1, 1), "scales": (1, 1), "qzeros": (1, 32 // self.bits), "bias": (0, 1)}
            return take_ranges(t, dims[leaf][0], ranges, dims[leaf][1]) if leaf in dims else t  # g_idx: all rows
        if leaf == "qweight":
            return take_ranges(t, 0, ranges, 32 // self.bits)
        if leaf == "g_idx":
            local = take_ranges(t, 0, ranges)
            return local if self.full_groups else local - ranges[0][0] // self.group_size
        if leaf in ("scales", "qzeros") and not self.full_groups:
            return take_ranges(t, 0, ranges, self.group_size)
        return t  # bias (added once after the all-reduce), or every group's scales/zeros

    def weight_loader(self, leaf: str, t: torch.Tensor, shard_id: object = None, presharded: bool = False) -> None:
        target = getattr(self, leaf, None)
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"GPTQ layer has no tensor {leaf!r}")
        local = t if presharded else self.shard_tensor(leaf, t)
        if target.shape != local.shape:
            raise ValueError(f"GPTQ {leaf}: checkpoint slice has shape {tuple(local.shape)}, expected "
                             f"{tuple(target.shape)}")
        target.data.copy_(local)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                               self.in_features, self.out_features, dtype)  # (N, K)

    def _prepare_fast_path(self) -> Optional[dict[str, torch.Tensor]]:
        """For 2/4/8 bits with whole groups: rows sorted by group (act-order rows are permuted
        once here, and the input is permuted to match at run time, as exllama does), so the
        dequantization is a reshape and two broadcasts instead of per-row gathers."""
        K, N, g = self.in_features, self.out_features, self.group_size
        if self.bits == 3 or K % g or self.scales.shape[0] != K // g:  # e.g. a row slice keeping all groups
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
        if qweight.device.type == "cpu" and N % 16 == 0 and g % per_word == 0 and cpu_ops.load():
            # The kernel's operands: packed rows as they are, scales and zeros per group.
            fast["kernel_qweight"] = qweight.contiguous()
            fast["kernel_scales"] = fast["scales"][:, 0, :].contiguous()
            fast["kernel_zeros"] = fast["zeros"][:, 0, :].contiguous()
        else:
            logger.info("GPTQ %dx%d (%d-bit): no CPU kernel for it here, dequantizing per call", K, N, self.bits)
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fast is None:
            self._fast = self._prepare_fast_path() or {}
        f = self._fast
        bias = self.bias if self.tp_size == 1 else None  # a row slice adds it after the all-reduce
        if not f:
            out = F.linear(x, self.dequantized_weight(x.dtype), bias)
            return out if self.tp_size == 1 else self._reduce(out)
        K, N = self.in_features, self.out_features
        # NOTE: the packed kernel at every row count: on a 2-core EPYC (82M Llama, 4-bit g128) it
        # beat dequantize-then-matmul at 1 row (5x), 64 (batch decode, 89 vs 158 ms a step) and
        # 128-512 (prefill, 793 vs 435 and 708 vs 637 tok/s): unpacking in registers costs less
        # than writing and re-reading a float32 copy of the weight on every call.
        if "kernel_qweight" in f:
            out = _packed_kernel(x, f, self.bits, self.group_size)
            if self.tp_size > 1:
                return self._reduce(out)
            return out + self.bias if self.bias is not None else out
        # An arithmetic shift then a mask narrower than the shift leaves exactly the packed bits.
        q = (f["qweight"] >> f["shifts"]) & ((1 << self.bits) - 1)  # (K / per_word, per_word, N)
        w = ((q.view(-1, self.group_size, N).to(torch.float32) - f["zeros"]) * f["scales"]).view(K, N)
        if "perm" in f:
            x = x.index_select(-1, f["perm"])
        out = torch.matmul(x, w.to(x.dtype))
        if self.tp_size > 1:
            return self._reduce(out)
        return out + self.bias if self.bias is not None else out

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        out = tp_all_reduce(out)
        return out + self.bias if self.bias is not None else out


class GPTQMergedLinear(nn.Module):
    """The quantized counterpart of MergedLinear: one GPTQ layer per checkpoint projection.

    The pieces cannot be concatenated into one packed matrix: with act-order each has its own
    g_idx, so each is dequantized and applied on its own and the outputs are concatenated.
    """

    def __init__(self, in_features: int, shard_sizes: dict[Union[str, int], int], bias: bool, bits: int,
                 group_size: int, specs: Optional[dict[Union[str, int], ShardSpec]] = None) -> None:
        super().__init__()
        specs = specs or {}
        self.shards = nn.ModuleDict({str(k): GPTQLinear(in_features, n, bias, bits, group_size, specs.get(k))
                                     for k, n in shard_sizes.items()})
        self.shard_names = [str(k) for k in shard_sizes]
        self._merged: Optional[dict[str, torch.Tensor]] = None  # built on first use, after loading

    def _merged_kernel(self) -> Optional[dict[str, torch.Tensor]]:
        """The pieces' kernel operands side by side, when one kernel call can serve them all:
        every piece on the packed kernel with the same bits, groups and row order (q/k/v and
        gate/up quantized against the same input share the act-order permutation). Built once;
        the concatenated copy costs another eighth of float32's bytes at 4 bits."""
        if self._merged is None:
            shards = list(self.shards.values())
            for m in shards:
                if m._fast is None:
                    m._fast = m._prepare_fast_path() or {}
            first, lead = shards[0]._fast, shards[0]
            same = all("kernel_qweight" in m._fast and m.bits == lead.bits and m.group_size == lead.group_size
                       and m.tp_size == 1 and ("perm" in m._fast) == ("perm" in first)
                       and ("perm" not in first or torch.equal(m._fast["perm"], first["perm"])) for m in shards)
            self._merged = {}
            if same:
                self._merged = {k: torch.cat([m._fast[k] for m in shards], dim=1).contiguous()
                                for k in ("kernel_qweight", "kernel_scales", "kernel_zeros")}
                if "perm" in first:
                    self._merged["perm"] = first["perm"]
                if lead.bias is not None:
                    self._merged["bias"] = torch.cat([m.bias.detach() for m in shards])
        return self._merged or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self._merged_kernel()
        lead = next(iter(self.shards.values()))
        if merged is not None:
            # One kernel call for q/k/v (or gate/up) instead of one per piece and a cat.
            out = _packed_kernel(x, merged, lead.bits, lead.group_size)
            return out + merged["bias"] if "bias" in merged else out
        return torch.cat([m(x) for m in self.shards.values()], dim=-1)

    def shard_tensor(self, leaf: str, t: torch.Tensor, shard_id: Union[str, int]) -> torch.Tensor:
        return self.shards[str(shard_id)].shard_tensor(leaf, t)

    def load_shard(self, leaf: str, loaded: torch.Tensor, shard_id: Union[str, int], presharded: bool = False) -> None:
        try:
            self.shards[str(shard_id)].weight_loader(leaf, loaded, None, presharded)
        except ValueError as e:
            raise ValueError(f"quantized shard {shard_id!r}: {e}") from None

    def checkpoint_leaves(self) -> list[str]:
        first = next(iter(self.shards.values()))
        return ["qweight", "qzeros", "scales", "g_idx"] + (["bias"] if first.bias is not None else [])
