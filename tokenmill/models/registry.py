"""config.json's `architectures[0]` -> the class that runs it. Never chosen from a folder name."""
from __future__ import annotations

import importlib

from torch import nn

# Each architecture is one entry here and, for a new family, one new file.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.models.llama", "LlamaForCausalLM"),
    "GPT2LMHeadModel": ("tokenmill.models.gpt2", "GPT2LMHeadModel"),
    "OPTForCausalLM": ("tokenmill.models.opt", "OPTForCausalLM"),
    "BloomForCausalLM": ("tokenmill.models.bloom", "BloomForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architectures: list[str] | None) -> type[nn.Module]:
    if not architectures:
        raise ValueError("config.json has no 'architectures' entry; cannot pick a model class")
    arch = architectures[0]
    if arch not in _MODELS:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(supported_architectures())}")
    module, cls = _MODELS[arch]
    return getattr(importlib.import_module(module), cls)
