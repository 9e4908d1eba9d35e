"""What every causal LM class shares: the output head, its tying to the input embeddings, and
the two calls the model runner makes (forward -> hidden states, compute_logits -> logits)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CausalLM(nn.Module):
    """Subclasses build their body, set `self.lm_head`, and name their input embedding."""

    packed_modules_mapping: dict[str, tuple[str, Any]] = {}
    embedding_path: str = ""  # e.g. "model.embed_tokens"

    def __init__(self, cfg: Any, default_tie: bool) -> None:
        super().__init__()
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", default_tie))

    def tie_weights(self) -> None:
        if self.tie_word_embeddings:
            self.lm_head.weight = self.get_submodule(self.embedding_path).weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
