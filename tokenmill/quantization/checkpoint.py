"""Write a quantized checkpoint in the GPTQ v1 format: safetensors shards, an index that records
every shard's sha256 (checked at load), `quantization_config` in config.json and
quantize_config.json, and the tokenizer."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tokenmill.models.loader import file_sha256
from tokenmill.quantization.config import QuantizeConfig

logger = logging.getLogger(__name__)


def quantized_state_dict(model: nn.Module, packed: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The model's tensors with each quantized linear's weight replaced by its packed tensors;
    everything else in float16, as GPTQ checkpoints carry it."""
    state = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in packed:
            continue
        if tied and name == "lm_head.weight":
            continue
        state[name] = tensor.to(torch.float16) if tensor.is_floating_point() else tensor
    for module, tensors in packed.items():
        for leaf, t in tensors.items():
            state[f"{module}.{leaf}"] = t.contiguous()
    return {k: v.contiguous() for k, v in state.items()}


def save_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_size: int) -> dict[str, Any]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    weight_map, hashes = {}, {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        hashes[fname] = file_sha256(str(out / fname))
        weight_map.update({k: fname for k in shard})
        logger.info("wrote %s (%d tensors)", fname, len(shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total, "sha256": hashes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return index


def save_quantized(model: nn.Module, tokenizer: Any, src: str, out_dir: str, qcfg: QuantizeConfig,
                   packed: dict[str, dict[str, torch.Tensor]], max_shard_size: int) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        old.unlink()
    save_sharded(quantized_state_dict(model, packed), out, max_shard_size)
    config = model.config.to_dict()
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    config["quantization_config"] = qcfg.to_dict()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps(qcfg.to_dict(), indent=2))
    tokenizer.save_pretrained(out)
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        shutil.copy(gen, out / "generation_config.json")
