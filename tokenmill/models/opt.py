"""OPTForCausalLM: learned positions offset by 2, LayerNorm before or after each block
(do_layer_norm_before), ReLU MLP, and project_in/project_out when word_embed_proj_dim differs
from hidden_size (OPT-350m)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.attention import PagedAttention
from tokenmill.distributed.parallel_state import local_heads
from tokenmill.layers.linear import (ColumnParallelLinear, MergedLinear, ParallelLMHead, RowParallelLinear,
                                    VocabParallelEmbedding)
from tokenmill.models.base import CausalLM

# OPT's learned position table starts at index 2 (a fairseq convention kept in the checkpoint).
_POSITION_OFFSET = 2


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        bias = getattr(cfg, "enable_bias", True)
        hd = h // heads
        local, _ = local_heads(heads, heads)
        self.hidden = local * hd  # this rank's share of q (and of k, v)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = MergedLinear(h, {p: (heads, hd) for p in ("q", "k", "v")}, bias=bias)
        self.self_attn.out_proj = RowParallelLinear(h, h, bias=bias)
        self.self_attn.attn = PagedAttention(local, local, hd, hd ** -0.5)
        ln_affine = getattr(cfg, "layer_norm_elementwise_affine", True)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=ln_affine)
        self.fc1 = ColumnParallelLinear(h, cfg.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, h, bias=bias)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=ln_affine)
        self.pre_ln = cfg.do_layer_norm_before

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        q, k, v = self.self_attn.qkv_proj(h).split(self.hidden, dim=-1)
        x = x + self.self_attn.out_proj(self.self_attn.attn(q, k, v))
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(F.relu(self.fc1(h)))
        return x if self.pre_ln else self.final_layer_norm(x)


class OPTForCausalLM(CausalLM):
    embedding_path = "model.decoder.embed_tokens"
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}
    layers_path = "model.decoder.layers"
    first_stage_modules = ("model.decoder.embed_positions", "model.decoder.project_in")
    last_stage_modules = ("model.decoder.final_layer_norm", "model.decoder.project_out")

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=True)
        if cfg.activation_function != "relu":
            raise ValueError(f"unsupported OPT activation {cfg.activation_function!r}")
        proj = cfg.word_embed_proj_dim
        d = nn.Module()
        d.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj)
        d.embed_positions = nn.Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, cfg.hidden_size)
        d.project_in = nn.Linear(proj, cfg.hidden_size, bias=False) if proj != cfg.hidden_size else None
        d.project_out = nn.Linear(cfg.hidden_size, proj, bias=False) if proj != cfg.hidden_size else None
        keep_final = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        d.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=getattr(
            cfg, "layer_norm_elementwise_affine", True)) if keep_final else None
        d.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.model = nn.Module()
        self.model.decoder = d
        self.lm_head = ParallelLMHead(proj, cfg.vocab_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        return x + d.embed_positions(positions + _POSITION_OFFSET)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        return d.project_out(x) if d.project_out is not None else x
