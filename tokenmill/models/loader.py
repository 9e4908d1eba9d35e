"""Build a model from a local Hugging Face folder and fill it with the checkpoint's weights.

The model is built on the meta device (no memory, no random init), quantized layers are swapped
in where the checkpoint holds GPTQ tensors, it is materialised empty on the target device, and
every tensor is then written exactly once from the checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tokenmill.config import ModelConfig
from tokenmill.distributed.parallel_state import get_parallel_state
from tokenmill.models.base import MissingLayer
from tokenmill.models.registry import get_model_class

logger = logging.getLogger(__name__)

# Written by `tokenmill convert` next to config.json: the folder holds one weights folder per rank.
PRESHARDED_FILE = "tokenmill_parallel.json"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _read_index(folder: str) -> tuple[Optional[str], Optional[dict[str, Any]]]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index_name)
        if os.path.isfile(path):
            with open(path) as f:
                return index_name, json.load(f)
    return None, None


def checkpoint_files(folder: str) -> list[str]:
    """The weight files of a checkpoint: sharded or single safetensors, else pytorch .bin."""
    index_name, index = _read_index(folder)
    if index is not None:
        shards = sorted(set(index["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise ValueError(f"{index_name} in {folder!r} names missing shard(s): {', '.join(missing)}")
        return [os.path.join(folder, s) for s in shards]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(glob.glob(os.path.join(folder, pattern)))
        if files:
            return files
    raise ValueError(f"no weights in {folder!r}: expected model.safetensors, sharded safetensors with "
                     "model.safetensors.index.json, or pytorch_model*.bin")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shards(folder: str) -> None:
    """Check each shard against the sha256 recorded in the index's metadata, when there is one."""
    _, index = _read_index(folder)
    recorded = ((index or {}).get("metadata") or {}).get("sha256") or {}
    for name, digest in tqdm(sorted(recorded.items()), desc="checking shards", unit="file",
                             disable=len(recorded) < 2):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"shard {name!r} listed in the index is missing from {folder!r}")
        if file_sha256(path) != digest:
            raise ValueError(f"shard {name!r} in {folder!r} is corrupted or truncated: its sha256 does not "
                             "match the one recorded when it was written")


def checkpoint_tensor_names(folder: str) -> set[str]:
    _, index = _read_index(folder)
    if index is not None:
        return set(index["weight_map"])
    names: set[str] = set()
    for path in checkpoint_files(folder):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                names.update(f.keys())
    return names


def iterate_weights(folder: str, skip: Optional[Callable[[str], bool]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor; those `skip` names are not even read."""
    files = checkpoint_files(folder)
    for path in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if skip is None or not skip(name):
                        yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from ((k, v) for k, v in state.items() if skip is None or not skip(k))


def presharded_layout(folder: str) -> Optional[dict[str, Any]]:
    """The layout `tokenmill convert` wrote (tensor_parallel_size, dtype), or None for a plain checkpoint."""
    path = os.path.join(folder, PRESHARDED_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def rank_weights_folder(folder: str) -> tuple[str, bool]:
    """Where this rank reads its weights, and whether they are already cut to its slice."""
    layout = presharded_layout(folder)
    if layout is None:
        return folder, False
    ps = get_parallel_state()
    if layout["tensor_parallel_size"] != ps.tp_size:
        raise ValueError(f"{folder!r} was converted for tensor_parallel_size={layout['tensor_parallel_size']}, "
                         f"the engine runs with {ps.tp_size}; convert it again or match the size")
    return os.path.join(folder, f"rank_{ps.tp_rank}"), True


def build_model(config: ModelConfig, weights_folder: Optional[str] = None, verify: bool = True) -> nn.Module:
    """The model of this rank (its tensor-parallel slices, its pipeline stage), on meta.

    Raises ValueError when the layout does not fit the model (heads, layers, GPTQ groups)."""
    hf = config.hf_config
    cls = get_model_class(getattr(hf, "architectures", None))
    with _default_dtype(config.torch_dtype), torch.device("meta"):
        model = cls(hf, config.torch_dtype)
        model.split_stages()
        quant = getattr(hf, "quantization_config", None)
        if quant:
            from tokenmill.quantization.model import swap_in_quantized_layers

            folder = weights_folder or config.model
            if verify:
                verify_shards(folder)
            swap_in_quantized_layers(model, quant, checkpoint_tensor_names(folder))
    return model


def load_model(config: ModelConfig) -> nn.Module:
    folder, presharded = rank_weights_folder(config.model)
    model = build_model(config, folder)
    model = model.to_empty(device=config.torch_device)
    for module in model.modules():  # buffers computed at build time were lost on meta
        if hasattr(module, "init_buffers"):
            module.init_buffers(config.torch_device)
    model.tie_weights()
    load_weights(model, iterate_weights(folder, lambda name: locate(model, name) is None), presharded)
    return model.eval()


def _route(model: nn.Module, name: str, packed: dict[str, tuple[str, Any]]) -> tuple[str, str, Any]:
    """Checkpoint tensor name -> (module path in the model, leaf name, shard id or None)."""
    module_path, _, leaf = name.rpartition(".")
    for ckpt_part, (fused, shard) in packed.items():
        if module_path.endswith("." + ckpt_part):
            return module_path[: -len(ckpt_part)] + fused, leaf, shard
    return module_path, leaf, None


def expected_tensors(model: nn.Module) -> set[tuple[str, str, Any]]:
    """Every (module path, leaf, shard) the checkpoint must provide."""
    expected: set[tuple[str, str, Any]] = set()
    merged: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(m + ".") for m in merged):
            continue  # the pieces of a merged module are listed through it
        if hasattr(module, "shard_names"):
            merged.append(path)
            expected.update((path, leaf, str(shard)) for shard in module.shard_names
                            for leaf in module.checkpoint_leaves())
            continue
        for leaf, _ in module.named_parameters(recurse=False):
            expected.add((path, leaf, None))
        for leaf, _ in module.named_buffers(recurse=False):
            if leaf not in module._non_persistent_buffers_set:
                expected.add((path, leaf, None))
    return expected


def _under_missing(model: nn.Module, path: str) -> bool:
    module = model
    for part in path.split("."):
        if isinstance(module, MissingLayer):
            return True
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if isinstance(module, nn.ModuleList) and int(part) < len(module) else None)
        if module is None:
            return False
    return isinstance(module, MissingLayer)


def locate(model: nn.Module, name: str) -> Optional[tuple[str, str, Any, nn.Module]]:
    """Checkpoint tensor name -> (module path, leaf, shard id, module), or None when this rank does
    not hold it (another pipeline stage's, an ignored buffer, a tied head). ValueError if unknown."""
    ignored = ("rotary_emb.inv_freq",) + tuple(getattr(model, "ignored_checkpoint_suffixes", ()))
    if name.endswith(ignored) or (getattr(model, "tie_word_embeddings", False) and name == "lm_head.weight"):
        return None
    path, leaf, shard = _route(model, name, getattr(model, "packed_modules_mapping", {}))
    prefix = getattr(model, "checkpoint_prefix", "")
    for candidate in (path, prefix + path) if prefix else (path,):
        if _under_missing(model, candidate):
            return None
        try:
            return candidate, leaf, shard, model.get_submodule(candidate)
        except AttributeError:
            continue  # checkpoints saved from the base model lack the wrapper's prefix
    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], presharded: bool = False) -> None:
    """Copy checkpoint tensors into `model`: fused projections go through `load_shard`, layers split
    over tensor-parallel ranks through `weight_loader`, which cuts this rank's slice (unless the
    checkpoint was pre-sharded by `tokenmill convert`)."""
    tied = getattr(model, "tie_word_embeddings", False)
    expected = expected_tensors(model)
    if tied:
        expected = {e for e in expected if e[0] != "lm_head" or e[1] != "weight"}
    loaded: set[tuple[str, str, Any]] = set()
    for name, tensor in weights:
        found = locate(model, name)
        if found is None:
            continue
        path, leaf, shard, module = found
        if getattr(module, "checkpoint_transposed", False) and leaf == "weight" and not presharded:
            tensor = tensor.t()
        if shard is not None:
            module.load_shard(leaf, tensor, shard, presharded)
        elif hasattr(module, "weight_loader"):
            module.weight_loader(leaf, tensor, None, presharded)
        else:
            target = getattr(module, leaf, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            if target.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(target.shape)}")
            target.data.copy_(tensor)
        loaded.add((path, leaf, None if shard is None else str(shard)))
    missing = sorted(f"{p}.{leaf}" + (f"[{s}]" if s is not None else "") for p, leaf, s in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
