"""What every causal LM class shares: the output head and its tying to the input embeddings, the
split into pipeline stages, and the calls the model runner makes (forward -> hidden states,
compute_logits -> logits).

A model is a stack: `embed` (first stage only), the decoder layers (each stage runs a contiguous
range of them), and `final` (last stage only: the final norm). Layers and modules another stage
runs are replaced by MissingLayer, which holds no weights, so the checkpoint's names still line up
and the loader skips what this rank does not hold.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from tokenmill.distributed.parallel_state import get_parallel_state, tp_all_gather


class MissingLayer(nn.Module):
    """A module another pipeline stage holds."""

    def forward(self, *args: Any) -> torch.Tensor:
        raise RuntimeError("this module belongs to another pipeline stage")


def stage_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """Contiguous layers per stage; the first stages take one more when they do not split evenly."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (pp_rank < extra)


class CausalLM(nn.Module):
    """Subclasses build their body, set `self.lm_head`, name their input embedding and layer
    stack, list the modules only the first / last stage runs, and implement embed and final."""

    packed_modules_mapping: dict[str, tuple[str, Any]] = {}
    embedding_path: str = ""  # e.g. "model.embed_tokens"
    layers_path: str = ""  # e.g. "model.layers"
    first_stage_modules: tuple[str, ...] = ()  # besides the embedding
    last_stage_modules: tuple[str, ...] = ()  # besides lm_head

    def __init__(self, cfg: Any, default_tie: bool) -> None:
        super().__init__()
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", default_tie))
        self.vocab_size = cfg.vocab_size
        self.stage_layers: list[nn.Module] = []
        self.is_first_stage = self.is_last_stage = True

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Abstract: every architecture (llama.py, gpt2.py, opt.py, bloom.py) defines its own.
        raise NotImplementedError(f"{type(self).__name__} must define embed()")

    def final(self, x: torch.Tensor) -> torch.Tensor:
        # Abstract: every architecture defines its final norm.
        raise NotImplementedError(f"{type(self).__name__} must define final()")

    def split_stages(self) -> None:
        """Keep only this rank's pipeline stage (called once, on the meta model)."""
        ps = get_parallel_state()
        layers: nn.ModuleList = self.get_submodule(self.layers_path)
        start, end = stage_layer_range(len(layers), ps.pp_rank, ps.pp_size)
        for i in range(len(layers)):
            if not start <= i < end:
                layers[i] = MissingLayer()
        self.stage_layers = [layers[i] for i in range(start, end)]
        self.is_first_stage, self.is_last_stage = ps.is_first_stage, ps.is_last_stage
        drop = []
        if not ps.is_first_stage:
            drop += list(self.first_stage_modules)
            if not (ps.is_last_stage and self.tie_word_embeddings):  # a tied head needs it
                drop.append(self.embedding_path)
        if not ps.is_last_stage:
            drop += list(self.last_stage_modules) + ["lm_head"]
        for path in drop:
            parent, _, attr = path.rpartition(".")
            if getattr(self.get_submodule(parent), attr, None) is not None:
                setattr(self.get_submodule(parent), attr, MissingLayer())

    def tie_weights(self) -> None:
        if self.tie_word_embeddings and not isinstance(getattr(self, "lm_head", None), MissingLayer):
            self.lm_head.weight = self.get_submodule(self.embedding_path).weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states after this stage: the final ones on the last stage.

        The first stage embeds input_ids; later stages continue from the previous stage's hidden.
        """
        x = self.embed(input_ids, positions) if hidden is None else hidden
        for layer in self.stage_layers:
            x = layer(positions, x)
        return self.final(x) if self.is_last_stage else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Each tensor-parallel rank holds a slice of the vocabulary; gather and cut the padding.
        return tp_all_gather(self.lm_head(hidden))[..., :self.vocab_size]
