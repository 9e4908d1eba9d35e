"""GPT2LMHeadModel: learned positions, LayerNorm, GELU (tanh form), and Conv1D weights, stored
(in, out) in the checkpoint: `checkpoint_transposed` tells the loader to transpose them."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.layers.attention import PagedAttention
from tokenmill.models.base import CausalLM


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class Conv1D(nn.Linear):
    """A Linear whose checkpoint weight is (in, out); the loader transposes it."""

    checkpoint_transposed = True


class GPT2Block(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, heads = cfg.n_embd, cfg.n_head
        self.hidden, self.head_dim = h, h // heads
        inner = cfg.n_inner or 4 * h
        self.ln_1 = nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(h, 3 * h)
        self.attn.c_proj = Conv1D(h, h)
        self.attn.attn = PagedAttention(heads, heads, self.head_dim, self.head_dim ** -0.5
                                        if cfg.scale_attn_weights else 1.0)
        self.ln_2 = nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(h, inner)
        self.mlp.c_proj = Conv1D(inner, h)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(self.hidden, dim=-1)
        x = x + self.attn.c_proj(self.attn.attn(q, k, v))
        return x + self.mlp.c_proj(gelu_new(self.mlp.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(CausalLM):
    embedding_path = "transformer.wte"
    # The causal-mask buffers old checkpoints carry are not weights.
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=True)
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {cfg.activation_function!r}")
        self.transformer = nn.Module()
        t = self.transformer
        t.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        t.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        t.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        t.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for block in t.h:
            x = block(positions, x)
        return t.ln_f(x)
