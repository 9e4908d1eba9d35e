"""OPTForCausalLM: learned positions offset by 2, LayerNorm before or after each block
(do_layer_norm_before), ReLU MLP, and project_in/project_out when word_embed_proj_dim differs
from hidden_size (OPT-350m)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.attention import PagedAttention
from tokenmill.layers.linear import MergedLinear
from tokenmill.models.base import CausalLM

# OPT's learned position table starts at index 2 (a fairseq convention kept in the checkpoint).
_POSITION_OFFSET = 2


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        h, heads = cfg.hidden_size, cfg.num_attention_heads
        bias = getattr(cfg, "enable_bias", True)
        self.hidden = h
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = MergedLinear(h, {"q": h, "k": h, "v": h}, bias=bias)
        self.self_attn.out_proj = nn.Linear(h, h, bias=bias)
        self.self_attn.attn = PagedAttention(heads, heads, h // heads, (h // heads) ** -0.5)
        ln_affine = getattr(cfg, "layer_norm_elementwise_affine", True)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=ln_affine)
        self.fc1 = nn.Linear(h, cfg.ffn_dim, bias=bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, h, bias=bias)
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

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=True)
        if cfg.activation_function != "relu":
            raise ValueError(f"unsupported OPT activation {cfg.activation_function!r}")
        proj = cfg.word_embed_proj_dim
        d = nn.Module()
        d.embed_tokens = nn.Embedding(cfg.vocab_size, proj)
        d.embed_positions = nn.Embedding(cfg.max_position_embeddings + _POSITION_OFFSET, cfg.hidden_size)
        d.project_in = nn.Linear(proj, cfg.hidden_size, bias=False) if proj != cfg.hidden_size else None
        d.project_out = nn.Linear(cfg.hidden_size, proj, bias=False) if proj != cfg.hidden_size else None
        keep_final = cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
        d.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=getattr(
            cfg, "layer_norm_elementwise_affine", True)) if keep_final else None
        d.layers = nn.ModuleList(OPTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.model = nn.Module()
        self.model.decoder = d
        self.lm_head = nn.Linear(proj, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        d = self.model.decoder
        x = d.embed_tokens(input_ids)
        if d.project_in is not None:
            x = d.project_in(x)
        x = x + d.embed_positions(positions + _POSITION_OFFSET)
        for layer in d.layers:
            x = layer(positions, x)
        if d.final_layer_norm is not None:
            x = d.final_layer_norm(x)
        return d.project_out(x) if d.project_out is not None else x
