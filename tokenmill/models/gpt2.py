"""GPT2LMHeadModel: learned positions, LayerNorm, GELU (tanh form), and Conv1D weights, stored
(in, out) in the checkpoint: `checkpoint_transposed` tells the loader to transpose them."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import local_heads
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tokenmill.models.base import CausalLM


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Block(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, heads = cfg.n_embd, cfg.n_head
        self.head_dim = h // heads
        local, _ = local_heads(heads, heads)
        self.hidden = local * self.head_dim  # this rank's share of q (and of k, v)
        inner = cfg.n_inner or 4 * h
        self.ln_1 = nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
        # Conv1D weights are stored (in, out) in the checkpoint: the loader transposes them.
        self.attn = nn.Module()
        parts = {p: (heads, self.head_dim) for p in ("q", "k", "v")}  # one tensor, [q | k | v]
        self.attn.c_attn = ColumnParallelLinear(h, parts, bias=True, checkpoint_transposed=True)
        self.attn.c_proj = RowParallelLinear(h, h, bias=True, checkpoint_transposed=True)
        self.attn.attn = PagedAttention(local, local, self.head_dim, self.head_dim ** -0.5
                                        if cfg.scale_attn_weights else 1.0)
        self.ln_2 = nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = ColumnParallelLinear(h, inner, bias=True, checkpoint_transposed=True)
        self.mlp.c_proj = RowParallelLinear(inner, h, bias=True, checkpoint_transposed=True)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(self.hidden, dim=-1)
        x = x + self.attn.c_proj(self.attn.attn(q, k, v))
        return x + self.mlp.c_proj(gelu_new(self.mlp.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(CausalLM):
    embedding_path = "transformer.wte"
    layers_path = "transformer.h"
    first_stage_modules = ("transformer.wpe",)
    last_stage_modules = ("transformer.ln_f",)
    # The causal-mask buffers old checkpoints carry are not weights.
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=True)
        if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {cfg.activation_function!r}")
        self.transformer = nn.Module()
        t = self.transformer
        t.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.n_embd)
        t.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        t.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        t.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(cfg.n_embd, cfg.vocab_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
