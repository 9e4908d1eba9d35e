"""Paged attention in plain torch: K/V are written to and read from the block pool.

The flat batch holds the decode tokens first (one per sequence), then each prefill chunk. Decodes
come in groups of similar context length, each attended in one batched SDPA call over its
gathered blocks (padded to the group's longest context, so grouping keeps the padding small);
each prefill chunk gets its own call (causal, or with an explicit mask when it continues an
earlier chunk or has a sliding window).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    start: int  # index of the chunk's first token in the flat batch
    query_len: int  # tokens computed now
    context_len: int  # tokens with KV after this step (earlier chunks + this one)
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class DecodeGroup:
    """Decode tokens attended in one batched call: one token per sequence, similar context lengths."""

    start: int  # index of the group's first token in the flat batch
    block_tables: torch.Tensor  # [G, max_blocks] long, padded with block 0
    context_lens: torch.Tensor  # [G] long


@dataclass
class AttentionContext:
    """What one step's attention needs to know; set by the model runner around the forward."""

    slot_mapping: torch.Tensor  # [T] long: the pool slot each token's K/V goes to
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)


_context: Optional[AttentionContext] = None


def set_attention_context(ctx: Optional[AttentionContext]) -> None:
    global _context  # one forward at a time per process, as in nano-vllm's set_context
    _context = ctx


def get_attention_context() -> AttentionContext:
    if _context is None:
        raise RuntimeError("attention called outside a model-runner step")
    return _context


class PagedAttention(nn.Module):
    """Scaled dot-product attention whose K/V live in a paged pool.

    The pool tensors `k_cache`/`v_cache` ([num_blocks, block_size, num_kv_heads, head_dim]) are
    bound by the model runner after it sizes the pool.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: Optional[int] = None, alibi_slopes: Optional[list[float]] = None) -> None:
        super().__init__()
        # ALiBi (Bloom): scores get slope_h * key_position added; softmax ignores the per-query shift.
        self.alibi_slopes = alibi_slopes
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H*hd], k/v: [T, KVH*hd] -> [T, H*hd]."""
        ctx = get_attention_context()
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.k_cache.numel():
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, k)
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, v)
        out = torch.empty_like(q)
        for g in ctx.decodes:
            sl = slice(g.start, g.start + g.context_lens.shape[0])
            out[sl] = self._decode(q[sl], g.block_tables, g.context_lens)
        for p in ctx.prefills:
            sl = slice(p.start, p.start + p.query_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], p)
        return out.view(T, self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        # [..., nb] -> [..., nb * block_size, KVH, hd]; index_select is much cheaper than
        # advanced indexing for this on CPU.
        g = cache.index_select(0, block_tables.reshape(-1))
        return g.view(*block_tables.shape[:-1], -1, self.num_kv_heads, self.head_dim)

    def _decode(self, q: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        D = q.shape[0]
        k = self._gather(self.k_cache, block_tables).transpose(1, 2)  # (D, KVH, L, hd)
        v = self._gather(self.v_cache, block_tables).transpose(1, 2)
        pos = torch.arange(k.shape[2], device=q.device)
        mask = pos[None, :] < context_lens[:, None]  # (D, L)
        if self.sliding_window is not None:
            mask &= pos[None, :] >= (context_lens[:, None] - self.sliding_window)
        attn_mask = mask[:, None, None, :]
        if self.alibi_slopes is not None:  # (D, H, 1, L) additive bias
            bias = torch.tensor(self.alibi_slopes, device=q.device)[None, :, None, None] * pos.float()
            attn_mask = bias.masked_fill(~attn_mask, float("-inf")).to(q.dtype)
        o = F.scaled_dot_product_attention(q.view(D, self.num_heads, 1, self.head_dim), k, v,
                                           attn_mask=attn_mask, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.view(D, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: PrefillChunk) -> torch.Tensor:
        n, ctx_len = p.query_len, p.context_len
        if ctx_len > n:  # continues earlier chunks: read the whole context back from the pool
            nb = -(-ctx_len // self.k_cache.shape[1])
            k = self._gather(self.k_cache, p.block_table[:nb])[:ctx_len]
            v = self._gather(self.v_cache, p.block_table[:nb])[:ctx_len]
        mask = None
        if ctx_len > n or self.alibi_slopes is not None or (self.sliding_window is not None
                                                             and self.sliding_window < n):
            qpos = torch.arange(ctx_len - n, ctx_len, device=q.device)[:, None]
            kpos = torch.arange(ctx_len, device=q.device)[None, :]
            mask = kpos <= qpos
            if self.sliding_window is not None:
                mask &= kpos > qpos - self.sliding_window
            if self.alibi_slopes is not None:  # (H, n, ctx) additive bias
                bias = torch.tensor(self.alibi_slopes, device=q.device)[:, None, None] * kpos.float()
                mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),  # (H, n, hd), (KVH, ctx, hd)
            attn_mask=mask, is_causal=mask is None, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(0, 1)
