"""The Llama family: Llama (MHA/GQA, rope scaling, biases, head_dim), Mistral (sliding window)
and Qwen2 (q/k/v bias). One module serves all three; their checkpoints differ only in config.

Parameter names follow the checkpoint (model.layers.N.self_attn.o_proj.weight ...); q/k/v and
gate/up are fused here and `packed_modules_mapping` tells the loader where each piece goes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_ops
from tokenmill.layers.attention import PagedAttention
from tokenmill.distributed.parallel_state import local_heads
from tokenmill.layers.linear import MergedLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.base import CausalLM


def _rope_scaling(cfg: Any) -> Optional[dict[str, Any]]:
    # transformers 4.x writes `rope_scaling`; 5.x writes `rope_parameters` (with rope_theta inside).
    scaling = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    return dict(scaling) if scaling else None


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _sliding_window(cfg: Any, layer_idx: int) -> Optional[int]:
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None:  # Qwen2 marks which layers slide
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        hd = self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        # This rank's heads (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads = local_heads(heads, kv_heads)
        self.q_size = self.num_heads * hd
        self.kv_size = self.num_kv_heads * hd
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": (heads, hd), "k": (kv_heads, hd), "v": (kv_heads, hd)},
                                     bias=qkv_bias)
        self.o_proj = RowParallelLinear(heads * hd, cfg.hidden_size, bias=o_bias)
        self.rotary_emb = RotaryEmbedding(self.head_dim, cfg.max_position_embeddings, _rope_theta(cfg),
                                          _rope_scaling(cfg), dtype)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                                   sliding_window=_sliding_window(cfg, layer_idx))

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        # Queries and keys are rotated together: (T, H + KVH, hd) is a view of the fused output.
        if self.rotary_emb.rotate_(positions, qkv, self.num_heads + self.num_kv_heads):
            qk = qkv
        else:
            qk = self.rotary_emb(positions, qkv[:, :self.q_size + self.kv_size].view(T, -1, self.head_dim))
            qk = qk.view(T, self.q_size + self.kv_size)
        qs, kvs = self.q_size, self.kv_size
        o = self.attn(qk[:, :qs], qk[:, qs:qs + kvs], qkv[:, qs + kvs:])
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, bias: bool) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} for this architecture (expected silu)")
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {0: (inter, 1), 1: (inter, 1)}, bias=bias)
        self.inter = self.gate_up_proj.out_features // 2  # this rank's share
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if cpu_ops.usable(gate_up):
            return self.down_proj(torch.ops.tokenmill_cpu.silu_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, dtype: torch.dtype, qkv_bias: bool, o_bias: bool,
                 mlp_bias: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, dtype, qkv_bias, o_bias)
        self.mlp = LlamaMLP(cfg, mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, dtype: torch.dtype, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, dtype, qkv_bias, o_bias, mlp_bias)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Also MistralForCausalLM and Qwen2ForCausalLM (see the registry)."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    embedding_path = "model.embed_tokens"
    layers_path = "model.layers"
    last_stage_modules = ("model.norm",)

    def __init__(self, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(cfg, default_tie=False)
        arch = (getattr(cfg, "architectures", None) or [""])[0]
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
        qkv_bias = True if arch == "Qwen2ForCausalLM" else attention_bias
        o_bias = False if arch == "Qwen2ForCausalLM" else attention_bias
        self.model = LlamaModel(cfg, dtype, qkv_bias, o_bias, bool(getattr(cfg, "mlp_bias", False)))
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)
