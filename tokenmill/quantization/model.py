"""Swap a freshly built (meta) model's linears for GPTQ layers where the checkpoint holds them."""
from __future__ import annotations

import logging
from typing import Any

from torch import nn

from tokenmill.distributed.parallel_state import get_parallel_state
from tokenmill.layers.linear import MergedLinear, ShardSpec
from tokenmill.layers.quant_linear import GPTQLinear, GPTQMergedLinear
from tokenmill.quantization.config import QuantizeConfig

logger = logging.getLogger(__name__)


def swap_in_quantized_layers(model: nn.Module, quant: Any, tensor_names: set[str]) -> None:
    """Replace each linear whose checkpoint tensors include `<name>.qweight`.

    Settings per module come from the config and its dynamic rules, matched on the checkpoint's
    module names (q_proj, not our fused qkv_proj), as GPTQModel matches them.
    """
    cfg = quant if isinstance(quant, QuantizeConfig) else QuantizeConfig.from_dict(quant)
    # fused module name -> {shard id: checkpoint module name part}
    unpacked: dict[str, dict[Any, str]] = {}
    for ckpt_part, (fused, shard) in getattr(model, "packed_modules_mapping", {}).items():
        unpacked.setdefault(fused, {})[shard] = ckpt_part
    swaps = 0
    for path, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        parent_path, _, attr = path.rpartition(".")
        if isinstance(module, MergedLinear):
            names = {shard: f"{parent_path}.{unpacked[attr][shard]}" for shard in module.shard_offsets}
        else:
            names = {None: path}
        quantized = {s: f"{n}.qweight" in tensor_names for s, n in names.items()}
        if not any(quantized.values()):
            continue
        if not all(quantized.values()):
            raise ValueError(f"{path}: some of {sorted(names.values())} are quantized and some are not; "
                             "tokenmill needs the projections it fuses quantized alike")
        settings = {s: cfg.for_module(n) for s, n in names.items()}
        if any(v is None for v in settings.values()):
            raise ValueError(f"{path}: the checkpoint has GPTQ tensors for a module its dynamic rules skip")
        first = next(iter(settings.values()))
        if any((v["bits"], v["group_size"]) != (first["bits"], first["group_size"]) for v in settings.values()):
            raise ValueError(f"{path}: fused projections quantized with different bits/group sizes")
        has_bias = module.bias is not None
        spec = getattr(module, "spec", None)  # this rank's tensor-parallel slice
        if spec is not None and spec.kind == "vocab" and get_parallel_state().tp_size > 1:
            raise ValueError(f"{path}: a GPTQ output head cannot be split over tensor-parallel ranks")
        if isinstance(module, MergedLinear):
            sizes = {s: size for s, (_, size) in module.shard_offsets.items()}
            specs = {s: ShardSpec("col", {None: spec.ranges[s]}) for s in sizes}
            new: nn.Module = GPTQMergedLinear(module.in_features, sizes, has_bias, first["bits"], first["group_size"],
                                              specs)
        else:
            new = GPTQLinear(module.in_features, module.out_features, has_bias, first["bits"], first["group_size"],
                             spec, act_order=bool(first.get("desc_act")))
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
        swaps += 1
    if path_is_tied_head(model):
        raise ValueError("the checkpoint quantizes lm_head, but this model ties it to the embeddings")
    logger.info("GPTQ: %d linear modules run quantized (%d-bit, group %d by default)", swaps, cfg.bits, cfg.group_size)


def path_is_tied_head(model: nn.Module) -> bool:
    return bool(getattr(model, "tie_word_embeddings", False)) and isinstance(getattr(model, "lm_head", None),
                                                                             GPTQLinear)
