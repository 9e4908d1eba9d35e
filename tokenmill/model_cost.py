"""What a model costs to run: one description used by the model runner, the utilization meter
(MBU/MFU), the spill tier's cost model, the roofline and the benchmarks.

A `ModelCost` comes from a loaded model (`from_model`: the bytes it really holds, GPTQ's packed
weights included) or from a config alone (`ModelShape.cost`: no weights needed, for the roofline).
With L layers, q = heads * head_dim, M weights in the linear layers (the output head aside) and
V * h in the head:

    flops per token at context c    2 * (M + V * h) + 4 * L * q * c
        (every weight multiplies once per token; QK^T and PV take 2 * q FLOPs per key each)
    one step (chunks of n tokens after c computed, R rows of logits)
        flops = 2 * M * tokens + 2 * V * h * R + 4 * L * q * (keys the queries attend to)
        bytes = weight bytes (each weight read once) + KV read (c + n per chunk) + KV written
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmill.devices import DTYPE_BYTES


@dataclass(frozen=True)
class ModelCost:
    num_params: int  # every weight (a quantized one counts once, as in the float model)
    matmul_params: int  # weights of the linear layers, the output head aside
    head_params: int  # vocab x hidden
    weight_bytes: int  # bytes a decode step streams: every weight once, as stored
    kv_bytes_per_token: int  # one K and one V vector per layer
    num_layers: int
    q_size: int  # heads x head_dim

    def attention_flops(self, keys: int) -> float:
        """QK^T and PV for queries that attend to `keys` keys in all."""
        return 4.0 * self.num_layers * self.q_size * keys

    def flops_per_token(self, context: int = 0) -> float:
        """One token's forward at this context length (its logits included)."""
        return 2.0 * (self.matmul_params + self.head_params) + self.attention_flops(context)

    def step(self, chunks: list[tuple[int, int]], logit_rows: int) -> tuple[float, float]:
        """(flops, bytes) of one step; chunks are (tokens already computed, tokens computed now)."""
        tokens = sum(n for _, n in chunks)
        # A query at position p attends to p + 1 keys; a chunk at [c, c + n) sums to n*c + n(n+1)/2.
        keys = sum(n * c + n * (n + 1) // 2 for c, n in chunks)
        flops = 2.0 * self.matmul_params * tokens + 2.0 * self.head_params * logit_rows + self.attention_flops(keys)
        kv_read = sum(c + n for c, n in chunks) * self.kv_bytes_per_token
        return flops, float(self.weight_bytes + kv_read + tokens * self.kv_bytes_per_token)

    @classmethod
    def from_model(cls, model: nn.Module, kv_dtype: torch.dtype) -> "ModelCost":
        """From a loaded model (this rank's share of it under tensor/pipeline parallelism)."""
        from tokenmill.layers.attention import PagedAttention

        attn = [m for m in model.modules() if isinstance(m, PagedAttention)]
        head = getattr(model, "lm_head", None)
        head_params = head.in_features * head.out_features if hasattr(head, "in_features") else 0
        linears = [m for m in model.modules() if _is_linear(m) and m is not head
                   and not any(_is_linear(c) for c in m.children())]
        quantized = [m for m in linears if not isinstance(m, nn.Linear)]  # GPTQ: weights in buffers
        # Tied weights are one parameter (parameters() yields each once); GPTQ keeps its packed
        # weights in persistent buffers, which are what a step reads.
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for m in model.modules() for name, b in m.named_buffers(recurse=False)
            if name not in m._non_persistent_buffers_set)
        elem = torch.finfo(kv_dtype).bits // 8
        return cls(num_params=sum(p.numel() for p in model.parameters())
                   + sum(m.in_features * m.out_features for m in quantized),
                   matmul_params=sum(m.in_features * m.out_features for m in linears), head_params=head_params,
                   weight_bytes=weight_bytes,
                   kv_bytes_per_token=sum(2 * a.num_kv_heads * a.head_dim * elem for a in attn),
                   num_layers=len(attn), q_size=attn[0].num_heads * attn[0].head_dim if attn else 0)


def _is_linear(m: nn.Module) -> bool:
    return hasattr(m, "in_features") and hasattr(m, "out_features")


# Families with a two-matrix (non-gated) MLP and, in transformers, tied embeddings by default.
_GPT_STYLE = {"gpt2", "opt", "bloom"}


def _pick(cfg: Mapping[str, Any], *keys: str) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


@dataclass
class ModelShape:
    """A decoder's shape, read from its config; biases and learned positions are left out (under
    2% for the families read here)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    gated_mlp: bool = True  # gate+up+down (Llama); False: up+down (GPT-2/OPT/Bloom)
    num_params: int = field(init=False)  # embeddings + layers (+ untied head), norms included

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                  "vocab_size"):
            if not (isinstance(getattr(self, f), int) and getattr(self, f) > 0):
                raise ValueError(f"model shape: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape: {self.num_heads} heads do not split into {self.num_kv_heads} KV heads")
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        self.num_params = embed + self.num_layers * (self.layer_matmul_params + 2 * h) + h  # + norms

    @property
    def layer_matmul_params(self) -> int:
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + (3 if self.gated_mlp else 2) * h * self.intermediate_size

    def cost(self, dtype: str) -> ModelCost:
        """The cost with weights and KV cache in `dtype` (a name: float16, bfloat16, float32, fp8)."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(DTYPE_BYTES)})")
        b = DTYPE_BYTES[dtype]
        return ModelCost(num_params=self.num_params, matmul_params=self.num_layers * self.layer_matmul_params,
                         head_params=self.vocab_size * self.hidden_size, weight_bytes=self.num_params * b,
                         kv_bytes_per_token=2 * self.num_layers * self.num_kv_heads * self.head_dim * b,
                         num_layers=self.num_layers, q_size=self.num_heads * self.head_dim)

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShape":
        """From a transformers PretrainedConfig or a dict read from config.json."""
        cfg = cfg if isinstance(cfg, Mapping) else cfg.to_dict()
        cfg = cfg.get("text_config") or cfg  # multimodal checkpoints nest the decoder's config
        gpt = cfg.get("model_type") in _GPT_STYLE
        hidden = _pick(cfg, "hidden_size", "n_embd", "d_model")
        heads = _pick(cfg, "num_attention_heads", "n_head")
        got = dict(num_layers=_pick(cfg, "num_hidden_layers", "n_layer", "num_layers"), hidden_size=hidden,
                   num_heads=heads, vocab_size=_pick(cfg, "vocab_size"),
                   intermediate_size=_pick(cfg, "intermediate_size", "ffn_dim", "n_inner")
                   or (4 * hidden if gpt and hidden else None))
        missing = [k for k, v in got.items() if v is None]
        if missing:
            raise ValueError(f"config is missing {', '.join(missing)} (Llama/Mistral/Qwen2 or GPT-2/OPT keys)")
        kv = _pick(cfg, "num_key_value_heads") or heads
        head_dim = _pick(cfg, "head_dim") or hidden // heads
        tie = cfg.get("tie_word_embeddings")
        return cls(**got, num_kv_heads=kv, head_dim=head_dim, gated_mlp=not gpt,
                   tie_word_embeddings=bool(gpt if tie is None else tie))

