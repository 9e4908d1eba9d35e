"""Owns every tensor: the model, the KV pool, the flat batch of each step, and the sampler."""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

import torch
from torch import nn

from tokenmill.config import CacheConfig, ModelConfig, SchedulerConfig
from tokenmill.engine.scheduler import SampledToken, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.utilization import ModelCost, UtilizationMeter
from tokenmill.layers.attention import (AttentionContext, DecodeGroup, PagedAttention, PrefillChunk,
                                       set_attention_context)
from tokenmill.layers.linear import use_column_major_weights
from tokenmill.layers.sampler import Sampler
from tokenmill.models.loader import load_model
from tokenmill.outputs import Logprob

logger = logging.getLogger(__name__)

# On CUDA, share of device memory the engine may use in all (vLLM's gpu_memory_utilization) and
# what is kept back for activations and the allocator's slack.
_CUDA_MEMORY_FRACTION = 0.9
_CUDA_ACTIVATION_RESERVE = 1 << 30
# On CPU, share of the RAM available at start-up that the KV pool may take by default.
_CPU_MEMORY_FRACTION = 0.25
# Decodes are attended in groups of similar context length; a group is padded to its longest
# context, so it is closed once that would waste more than this share of its gathered KV.
_DECODE_GROUP_MAX_PADDING = 0.25


def _available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig) -> None:
        self.model_config = model_config
        self.block_size = cache_config.block_size
        self.device = model_config.torch_device
        self.dtype = model_config.torch_dtype
        self.model = load_model(model_config)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        # Bytes one decode step reads: every weight once (a tied head is the embedding itself);
        # GPTQ layers keep theirs in persistent buffers.
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters()) + sum(
            b.numel() * b.element_size() for m in self.model.modules() for name, b in m.named_buffers(recurse=False)
            if name not in m._non_persistent_buffers_set)
        self.cost = self._model_cost()
        self.meter = UtilizationMeter()
        if self.device.type == "cpu":
            use_column_major_weights(self.model)
        self.num_blocks = self._num_blocks(cache_config, scheduler_config)
        self._allocate_kv_cache()
        self.num_spill_blocks = cache_config.swap_space // (self.kv_bytes_per_token * self.block_size)
        self.spill_cache = None
        if self.num_spill_blocks:
            # The slower tier: host memory (pinned, for fast copies) when the pool is on a GPU.
            self.spill_cache = torch.zeros((*self.kv_cache.shape[:2], self.num_spill_blocks, *self.kv_cache.shape[3:]),
                                           dtype=self.dtype, pin_memory=self.device.type == "cuda")
            logger.info("KV spill tier: %d blocks, %.1f MiB", self.num_spill_blocks,
                        self.spill_cache.numel() * self.spill_cache.element_size() / 2**20)
        self.sampler = Sampler()
        self.generator = torch.Generator().manual_seed(model_config.seed)
        self.token_text: Optional[Callable[[int], str]] = None  # set by the engine when it has a tokenizer

    def _model_cost(self) -> ModelCost:
        head = getattr(self.model, "lm_head", None)
        head_params = head.in_features * head.out_features if head is not None else 0
        linear_params = sum(m.in_features * m.out_features for m in self.model.modules()
                            if hasattr(m, "in_features") and hasattr(m, "out_features") and m is not head
                            and not any(isinstance(c, nn.Module) and hasattr(c, "in_features")
                                        for c in m.children()))
        attn = self.attn_layers[0]
        return ModelCost(self.weight_bytes, self.kv_bytes_per_token, linear_params, head_params,
                         len(self.attn_layers), attn.num_heads * attn.head_dim)

    @property
    def flops_per_token(self) -> float:
        """Matmul FLOPs to compute one token's forward, ~2 per weight (embeddings excluded)."""
        return 2.0 * sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))

    @property
    def kv_bytes_per_token(self) -> int:
        elem = torch.finfo(self.dtype).bits // 8
        return sum(2 * a.num_kv_heads * a.head_dim * elem for a in self.attn_layers)

    def _num_blocks(self, cache: CacheConfig, sched: SchedulerConfig) -> int:
        per_block = self.kv_bytes_per_token * self.block_size
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(min(free, total * _CUDA_MEMORY_FRACTION)) - _CUDA_ACTIVATION_RESERVE
        else:
            # No point holding more than max_num_seqs full-length sequences could ever use.
            most = sched.max_num_seqs * (-(-sched.max_model_len // self.block_size)) * per_block
            budget = min(int(_available_ram() * _CPU_MEMORY_FRACTION), most)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no block of {per_block} bytes; "
                             "raise kv_cache_memory_bytes")
        return int(num_blocks)

    def _allocate_kv_cache(self) -> None:
        a = self.attn_layers[0]
        shape = (2, len(self.attn_layers), self.num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        # Zeroed, not empty: masked-out slots are still multiplied by 0 in attention, and 0 * NaN
        # from uninitialised memory would poison the output.
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB", self.num_blocks,
                    self.block_size, self.num_blocks * self.block_size, self.kv_cache.numel()
                    * self.kv_cache.element_size() / 2**20)

    def _slots(self, seq: Sequence, start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, banned: dict[int, list[int]]) -> dict[int, SampledToken]:
        """Run one step. Returns the sampled token of every sequence that finished its prompt/chunk."""
        start_time = time.perf_counter()
        self._copy_blocks(sched.block_copies)
        # Decodes sorted by context length, so neighbours can share one padded attention call.
        decodes = sorted(((s, n) for s, n in sched.scheduled if n == 1), key=lambda x: x[0].num_computed_tokens)
        prefills = [(s, n) for s, n in sched.scheduled if n > 1]
        ordered = decodes + prefills  # the attention layer expects the decode tokens first
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        for seq, n in decodes:
            p = seq.num_computed_tokens
            input_ids.append(seq.token_ids[p])
        if decodes:
            pos = torch.tensor([s.num_computed_tokens for s, _ in decodes], dtype=torch.long)
            positions.append(pos)
            slots.append(torch.tensor([s.block_table[p // bs] * bs + p % bs
                                       for (s, _), p in zip(decodes, pos.tolist())], dtype=torch.long))
        ctx = AttentionContext(slot_mapping=torch.empty(0), decodes=self._decode_groups(decodes))
        start = len(decodes)
        for seq, n in prefills:
            c = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[c:c + n])
            positions.append(torch.arange(c, c + n))
            slots.append(self._slots(seq, c, n))
            ctx.prefills.append(PrefillChunk(start, n, c + n, torch.tensor(seq.block_table, device=self.device)))
            start += n
        ctx.slot_mapping = torch.cat(slots).to(self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.cat(positions).to(self.device)
        set_attention_context(ctx)
        try:
            hidden = self.model(ids_t, pos_t)
        finally:
            set_attention_context(None)
        # Token index (in the flat batch) of each chunk's last token.
        ends, offset = [], 0
        for seq, n in ordered:
            offset += n
            ends.append(offset - 1)
        self._prompt_logprobs(ordered, hidden)
        samplers = [(i, seq) for i, (seq, n) in enumerate(ordered) if seq.num_computed_tokens + n == seq.num_tokens]
        chunks = [(seq.num_computed_tokens, n) for seq, n in ordered]
        if not samplers:
            self.meter.record(*self.cost.step(chunks, 0), time.perf_counter() - start_time)
            return {}
        idx = torch.tensor([ends[i] for i, _ in samplers], device=self.device)
        logits = self.model.compute_logits(hidden[idx])
        seqs = [s for _, s in samplers]
        out = self.sampler(logits, [s.params for s in seqs], [s.token_ids[:s.num_prompt_tokens] for s in seqs],
                           [s.output_token_ids for s in seqs], [s.generator for s in seqs],
                           [banned.get(s.seq_id, []) for s in seqs], self.generator)
        result = {}
        for j, seq in enumerate(seqs):
            top = None
            if seq.params.logprobs is not None:
                top = {out.token_ids[j]: Logprob(out.logprobs[j], out.ranks[j], self._text(out.token_ids[j]))}
                for r in range(seq.params.logprobs):
                    tid = int(out.top_ids[j, r])
                    if tid not in top:
                        top[tid] = Logprob(float(out.top_logprobs[j, r]), r + 1, self._text(tid))
            result[seq.seq_id] = SampledToken(out.token_ids[j], out.logprobs[j], top)
        self.meter.record(*self.cost.step(chunks, len(samplers)), time.perf_counter() - start_time)
        return result

    def _copy_blocks(self, copies: list[tuple[str, int, int]]) -> None:
        """Move blocks between the pool and the spill tier, in the order the block manager asked."""
        for direction, src, dst in copies:
            if direction == "out":
                self.spill_cache[:, :, dst].copy_(self.kv_cache[:, :, src], non_blocking=True)
            else:
                self.kv_cache[:, :, dst].copy_(self.spill_cache[:, :, src], non_blocking=True)
        if copies and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # a spill block may be reused right after

    def _decode_groups(self, decodes: list[tuple[Sequence, int]]) -> list[DecodeGroup]:
        """Split the length-sorted decodes into groups whose padding stays under the threshold."""
        groups, start = [], 0
        while start < len(decodes):
            end, total = start + 1, decodes[start][0].num_computed_tokens + 1
            while end < len(decodes):
                longest = decodes[end][0].num_computed_tokens + 1
                new_total = total + longest
                if longest * (end - start + 1) > new_total * (1 + _DECODE_GROUP_MAX_PADDING):
                    break
                end, total = end + 1, new_total
            seqs = [s for s, _ in decodes[start:end]]
            width = max(len(s.block_table) for s in seqs)
            tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
            groups.append(DecodeGroup(start, torch.tensor(tables, dtype=torch.long, device=self.device),
                                      torch.tensor([s.num_computed_tokens + 1 for s in seqs], device=self.device)))
            start = end
        return groups

    def _text(self, token_id: int) -> Optional[str]:
        return self.token_text(token_id) if self.token_text is not None else None

    def _prompt_logprobs(self, ordered: list[tuple[Sequence, int]], hidden: torch.Tensor) -> None:
        """Fill request.prompt_logprobs for the prompt positions computed in this step."""
        offset = 0
        for seq, n in ordered:
            req = seq.request
            c = seq.num_computed_tokens
            if seq.index == 0 and req.wants_prompt_logprobs and n > 0:
                # Hidden state at position p predicts prompt token p + 1.
                first = len(req.prompt_logprobs) - 1  # first position not yet scored
                last = min(c + n, seq.num_prompt_tokens - 1)  # positions [first, last)
                if first >= c and last > first:
                    h = hidden[offset + first - c: offset + last - c]
                    lp = self.model.compute_logits(h).float().log_softmax(-1)
                    targets = torch.tensor(req.prompt_token_ids[first + 1:last + 1], device=lp.device)
                    chosen = lp.gather(-1, targets[:, None])[:, 0]
                    ranks = (lp > chosen[:, None]).sum(-1) + 1
                    k = req.params.prompt_logprobs
                    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
                    for r in range(last - first):
                        tid = int(targets[r])
                        d = {tid: Logprob(float(chosen[r]), int(ranks[r]), self._text(tid))}
                        for j in range(k):
                            t = int(top_i[r, j])
                            if t not in d:
                                d[t] = Logprob(float(top_v[r, j]), j + 1, self._text(t))
                        req.prompt_logprobs.append(d)
            offset += n
