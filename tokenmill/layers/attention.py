"""Paged attention: K/V are written to and read from the block pool.

The flat batch holds the decode tokens first (one per sequence), then each prefill chunk; the
step's `AttentionContext` describes it once for every layer, in vLLM's varlen layout (a block-table
row, a query length and a context length per sequence).

On CPU in float32 each layer attends the whole step in one call of tokenmill's kernel
(kernels/cpu_attention.cpp), which reads K/V in place through the block table: decodes and prefill
chunks together, no gathered copy, no mask. Elsewhere (CUDA, bfloat16) decodes go in groups of
similar context length, each one batched SDPA call over its gathered blocks (padded to the group's
longest context, so grouping keeps the padding small), and each prefill chunk gets its own call.

NOTE: what depends only on the step (gather indices into the pool, masks, ALiBi biases, rotary
cos/sin rows) is built by the first layer that needs it and cached in the step's context
(`AttentionContext.cached`), so every other layer reuses it: no layer builds metadata per step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import cpu_ops


@dataclass
class AttentionContext:
    """What one step's attention needs to know; set by the model runner around the forward.

    Sequences are in flat-batch order: the first `num_decodes` have one query token each.
    """

    slot_mapping: torch.Tensor  # [T] long: the pool slot each token's K/V goes to
    block_tables: torch.Tensor  # [S, W] long, padded with block 0
    context_lens: torch.Tensor  # [S] long: tokens with KV once this step's are written
    query_lens: list[int]  # [S] tokens computed now
    num_decodes: int = 0
    # Decode sequences [a, b) attended in one padded call on the gather path (similar lengths).
    decode_groups: list[tuple[int, int]] = field(default_factory=list)
    # Per-step tensors shared by all layers, built on first use (not sent to other ranks).
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key: Any, build: Callable[[], Any]) -> Any:
        value = self.cache.get(key)
        if value is None:
            value = self.cache[key] = build()
        return value

    @property
    def query_start(self) -> torch.Tensor:
        """[S + 1] long: sequence s owns flat-batch rows [query_start[s], query_start[s + 1])."""
        return self.cached("query_start", lambda: torch.tensor([0, *self.query_lens]).cumsum(0).to(
            self.context_lens.device))

    def prefills(self) -> list[tuple[int, int, int, int]]:
        """(sequence index, first row, query tokens, context tokens) of each prefill chunk."""
        def build() -> list[tuple[int, int, int, int]]:
            lens, out, row = self.context_lens.tolist(), [], self.num_decodes
            for i in range(self.num_decodes, len(self.query_lens)):
                out.append((i, row, self.query_lens[i], lens[i]))
                row += self.query_lens[i]
            return out
        return self.cached("prefills", build)


_context: Optional[AttentionContext] = None


def set_attention_context(ctx: Optional[AttentionContext]) -> None:
    global _context  # one forward at a time per process, as in nano-vllm's set_context
    _context = ctx


def step_cached(key: Any, build: Callable[[], Any]) -> Any:
    """A per-step value shared by every layer (built once per step); outside a step, just built."""
    return _context.cached(key, build) if _context is not None else build()


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

    @property
    def _in_place(self) -> bool:
        """Whether the pool is read and written in place by tokenmill's CPU kernels (else ATen's
        index_copy_, gather and SDPA)."""
        flag = getattr(self, "_in_place_flag", None)
        if flag is None:
            cache = self.k_cache
            flag = self._in_place_flag = bool(cache.numel() and cache.device.type == "cpu" and cache.dtype == torch.float32
                                              and os.environ.get("TOKENMILL_PAGED_KERNEL", "1") != "0"
                                              and cpu_ops.load())
        return flag

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H*hd], k/v: [T, KVH*hd] -> [T, H*hd]."""
        ctx = get_attention_context()
        T = q.shape[0]
        if self.k_cache.numel() and self._in_place and k.dim() == 2 and k.stride(-1) == 1 and v.stride(-1) == 1:
            torch.ops.tokenmill_cpu.write_kv_(self.k_cache, self.v_cache, k, v, ctx.slot_mapping)
            written = True
        else:
            written = False
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.k_cache.numel() and not written:
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, k)
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, ctx.slot_mapping, v)
        if written:  # CPU, float32: the whole step in one call, reading the blocks where they lie
            slopes = ctx.cached(("alibi_slopes", tuple(self.alibi_slopes or ())), lambda: torch.tensor(
                self.alibi_slopes or [], dtype=torch.float32))
            out = torch.ops.tokenmill_cpu.paged_attention(
                q, self.k_cache, self.v_cache, ctx.block_tables, ctx.query_start, ctx.context_lens, self.scale,
                self.sliding_window or -1, slopes)
            return out.view(T, self.num_heads * self.head_dim)
        if not ctx.prefills() and len(ctx.decode_groups) == 1:  # decode-only in one group: no copy out
            return self._decode(ctx, 0, q).reshape(T, self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        for gi, (a, b) in enumerate(ctx.decode_groups):
            out[a:b] = self._decode(ctx, gi, q[a:b])
        for i, row, n, ctx_len in ctx.prefills():
            sl = slice(row, row + n)
            out[sl] = self._prefill(ctx, i, row, n, ctx_len, q[sl], k[sl], v[sl])
        return out.view(T, self.num_heads * self.head_dim)

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        # One index_select over the flat pool with the step's precomputed slot indices: much
        # cheaper on CPU than advanced indexing, and no per-layer index arithmetic.
        flat = cache.view(-1, self.num_kv_heads, self.head_dim)
        return flat.index_select(0, slots).view(*shape, self.num_kv_heads, self.head_dim)

    def _decode_meta(self, ctx: AttentionContext, gi: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(slots [G*L], boolean or additive mask [G, H|1, 1, L], L) for decode group gi."""
        bs = self.k_cache.shape[1]
        a, b = ctx.decode_groups[gi]
        tables, lens = ctx.block_tables[a:b], ctx.context_lens[a:b]

        def slots() -> tuple[torch.Tensor, int]:
            L = int(lens.max())
            nb = -(-L // bs)
            idx = (tables[:, :nb, None] * bs + torch.arange(bs, device=tables.device)).flatten(1)
            return idx[:, :L].reshape(-1), L

        idx, L = ctx.cached(("decode_slots", gi, bs), slots)

        def mask() -> torch.Tensor:
            pos = torch.arange(L, device=lens.device)
            m = pos[None, :] < lens[:, None]  # (G, L)
            if self.sliding_window is not None:
                m &= pos[None, :] >= (lens[:, None] - self.sliding_window)
            m = m[:, None, None, :]
            if self.alibi_slopes is None:
                return m
            bias = torch.tensor(self.alibi_slopes, device=m.device)[None, :, None, None] * pos.float()
            return bias.masked_fill(~m, float("-inf")).to(self.k_cache.dtype)  # (G, H, 1, L) additive

        key = ("decode_mask", gi, self.sliding_window, tuple(self.alibi_slopes or ()))
        return idx, ctx.cached(key, mask), L

    def _decode(self, ctx: AttentionContext, gi: int, q: torch.Tensor) -> torch.Tensor:
        D = q.shape[0]
        idx, mask, L = self._decode_meta(ctx, gi)
        k = self._gather(self.k_cache, idx, (D, L)).transpose(1, 2)  # (D, KVH, L, hd)
        v = self._gather(self.v_cache, idx, (D, L)).transpose(1, 2)
        o = F.scaled_dot_product_attention(q.view(D, self.num_heads, 1, self.head_dim), k, v,
                                           attn_mask=mask, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o.view(D, self.num_heads, self.head_dim)

    def _prefill_mask(self, n: int, ctx_len: int, device: torch.device) -> Optional[torch.Tensor]:
        if not (ctx_len > n or self.alibi_slopes is not None
                or (self.sliding_window is not None and self.sliding_window < n)):
            return None  # plain causal: SDPA's is_causal
        qpos = torch.arange(ctx_len - n, ctx_len, device=device)[:, None]
        kpos = torch.arange(ctx_len, device=device)[None, :]
        mask = kpos <= qpos
        if self.sliding_window is not None:
            mask &= kpos > qpos - self.sliding_window
        if self.alibi_slopes is not None:  # (H, n, ctx) additive bias
            bias = torch.tensor(self.alibi_slopes, device=device)[:, None, None] * kpos.float()
            mask = bias.masked_fill(~mask, float("-inf")).to(self.k_cache.dtype)
        return mask

    def _prefill(self, ctx: AttentionContext, i: int, row: int, n: int, ctx_len: int, q: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Prefill chunk of sequence i (flat-batch rows [row, row + n)) over its ctx_len tokens."""
        if ctx_len > n:  # continues earlier chunks: read the whole context back from the pool
            bs = self.k_cache.shape[1]

            def slots() -> torch.Tensor:
                nb = -(-ctx_len // bs)
                table = ctx.block_tables[i]
                idx = table[:nb, None] * bs + torch.arange(bs, device=table.device)
                return idx.reshape(-1)[:ctx_len]

            idx = ctx.cached(("prefill_slots", i, bs), slots)
            k = self._gather(self.k_cache, idx, (ctx_len,))
            v = self._gather(self.v_cache, idx, (ctx_len,))
        key = ("prefill_mask", i, self.sliding_window, tuple(self.alibi_slopes or ()))
        mask = ctx.cached(key, lambda: self._prefill_mask(n, ctx_len, q.device))  # None (causal) is cheap to redo
        # 4-D (1, H, n, hd) and (1, KVH, ctx, hd): SDPA's flash kernels take only batched inputs;
        # 3-D ones went to the math path (a quarter of a 512-token prefill on a 2-core EPYC).
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                           enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)
