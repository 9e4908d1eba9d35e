"""Build a model from a local Hugging Face folder and fill it with the checkpoint's weights.

The model is built on the meta device (no memory, no random init), materialised empty on the
target device, and every parameter is then written exactly once from the checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tokenmill.config import ModelConfig
from tokenmill.models.registry import get_model_class

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def checkpoint_files(folder: str) -> list[str]:
    """The weight files of a checkpoint: sharded or single safetensors, else pytorch .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
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


def iterate_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(folder)
    for path in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            yield from state.items()


def load_model(config: ModelConfig) -> nn.Module:
    hf = config.hf_config
    cls = get_model_class(getattr(hf, "architectures", None))
    with _default_dtype(config.torch_dtype), torch.device("meta"):
        model = cls(hf, config.torch_dtype)
    model = model.to_empty(device=config.torch_device)
    for module in model.modules():  # buffers computed at build time were lost on meta
        if hasattr(module, "init_buffers"):
            module.init_buffers(config.torch_device)
    model.tie_weights()
    load_weights(model, iterate_weights(config.model))
    return model.eval()


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into `model`, routing fused projections through their loaders."""
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            continue
        for ckpt_part, (fused, shard) in packed.items():
            if f".{ckpt_part}." in name:
                pname = name.replace(f".{ckpt_part}.", f".{fused}.")
                param = params.get(pname)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
                model.get_submodule(pname.rsplit(".", 1)[0]).weight_loader(param, tensor, shard)
                loaded.add(f"{pname}:{shard}")
                break
        else:
            param = params.get(name)
            if param is None:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            if param.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded.add(name)
    expected = set()
    for pname in params:
        module = model.get_submodule(pname.rsplit(".", 1)[0])
        if hasattr(module, "shard_offsets"):
            expected.update(f"{pname}:{shard}" for shard in module.shard_offsets)
        else:
            expected.add(pname)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}")
