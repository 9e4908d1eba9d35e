"""BloomForCausalLM: ALiBi instead of positions, a fused query_key_value laid out per head
([heads, 3, head_dim] along the output), LayerNorm after the word embeddings, GELU (tanh form)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import get_parallel_state, local_heads
from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.linear import ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tokenmill.models.base import CausalLM


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi paper's head slopes: a geometric sequence, interleaved when heads is not 2^k."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 2 * min(closest, num_heads - closest), 2)]
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    # The constant Bloom was trained with (tanh approximation), kept bit-for-bit.
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class BloomAttention(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        heads = cfg.n_head
        self.head_dim = cfg.hidden_size // heads
        self.num_heads, _ = local_heads(heads, heads)
        # The fused layout is per head, so a rank's heads are one contiguous block of rows.
        self.query_key_value = ColumnParallelLinear(cfg.hidden_size, {None: (heads, 3 * self.head_dim)}, bias=True)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias=True)
        first = get_parallel_state().tp_rank * self.num_heads
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   alibi_slopes=alibi_slopes(heads)[first:first + self.num_heads])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.query_key_value(x).view(T, self.num_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, i].reshape(T, -1) for i in range(3))
        return self.dense(self.attn(q, k, v))


class BloomBlock(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        eps = cfg.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = BloomAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = nn.Module()
        self.mlp.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, 4 * cfg.hidden_size, bias=True)
        self.mlp.dense_4h_to_h = RowParallelLinear(4 * cfg.hidden_size, cfg.hidden_size, bias=True)
        self.post_ln_residual = bool(cfg.apply_residual_connection_post_layernorm)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = self.self_attention(h) + (h if self.post_ln_residual else x)
        h = self.post_attention_layernorm(x)
        return self.mlp.dense_4h_to_h(bloom_gelu(self.mlp.dense_h_to_4h(h))) + (h if self.post_ln_residual else x)


class BloomForCausalLM(CausalLM):
    embedding_path = "transformer.word_embeddings"
    checkpoint_prefix = "transformer."  # the original bloom checkpoints store names without it
    layers_path = "transformer.h"
    first_stage_modules = ("transformer.word_embeddings_layernorm",)
    last_stage_modules = ("transformer.ln_f",)

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=True)
        self.transformer = nn.Module()
        t = self.transformer
        t.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        t.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        t.h = nn.ModuleList(BloomBlock(cfg) for _ in range(cfg.n_layer))
        t.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        return t.word_embeddings_layernorm(t.word_embeddings(input_ids))

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer.ln_f(x)
