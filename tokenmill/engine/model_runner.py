"""Owns every tensor: the model, the KV pool, the flat batch of each step, and the sampler."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from tokenmill.config import CacheConfig, ModelConfig, SchedulerConfig
from tokenmill.distributed.parallel_state import get_parallel_state
from tokenmill.engine.model_input import MicroBatch, StepInput, build_step, model_input, sampled_seqs
from tokenmill.engine.persistent_batch import BatchDiffer, PersistentBatch
from tokenmill.engine.kv_tiers import BlockCopy
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.utilization import UtilizationMeter
from tokenmill.model_cost import ModelCost
from tokenmill.layers.attention import PagedAttention, set_attention_context
from tokenmill.kernels.linear import assign_linear_kernels
from tokenmill.layers.sampler import SampledToken, Sampler
from tokenmill.spec_decode.verifier import Verifier
from tokenmill.structured.matcher import GrammarState, batch_bitmask
from tokenmill.models.loader import load_model
from tokenmill.outputs import Logprob

logger = logging.getLogger(__name__)

# On CUDA, share of device memory the engine may use in all (vLLM's gpu_memory_utilization) and
# what is kept back for activations and the allocator's slack.
_CUDA_MEMORY_FRACTION = 0.9
_CUDA_ACTIVATION_RESERVE = 1 << 30
# On CPU, share of the RAM available at start-up that the KV pool may take by default.
_CPU_MEMORY_FRACTION = 0.25


def _available_ram() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    """One per rank. `run` (every rank) computes a step's forward on this rank's slice of the
    model; `execute` (rank 0) builds the step from the scheduler's output, has every rank run it
    through the executor, and samples."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, executor: Optional[Any] = None,
                 companion: Optional[ModelCost] = None) -> None:
        # companion: the cost of a draft model that loads after this one on the same device and
        # keeps one KV block per block of this pool; its weights and KV come out of the same budget.
        self.companion = companion
        self.model_config = model_config
        self.executor = executor
        self.hidden_size = model_config.hf_config.hidden_size
        self.vocab_size = model_config.hf_config.vocab_size
        self.block_size = cache_config.block_size
        self.device = model_config.torch_device
        self.dtype = model_config.torch_dtype
        self.model = load_model(model_config)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.cost = ModelCost.from_model(self.model, self.dtype)
        self.meter = UtilizationMeter()
        self.linear_backends = assign_linear_kernels(self.model, model_config.linear_backend, self.device, self.dtype)
        self.num_blocks = self._num_blocks(cache_config, scheduler_config)
        self.num_spill_blocks = cache_config.swap_space_bytes // (self.kv_bytes_per_token * self.block_size)
        ps = get_parallel_state()
        if ps.world_size > 1:
            # Rank 0's block manager hands out block ids for every rank: all pools get the smallest size.
            sizes = torch.tensor([self.num_blocks, self.num_spill_blocks])
            dist.all_reduce(sizes, op=dist.ReduceOp.MIN, group=ps.control_group)
            self.num_blocks, self.num_spill_blocks = int(sizes[0]), int(sizes[1])
        if self.num_blocks < 1:  # raised on every rank alike, after the agreement
            raise ValueError(f"the KV cache budget holds no block of {self.kv_bytes_per_token * self.block_size} "
                             "bytes on some rank; raise kv_cache_memory_bytes")
        self._allocate_kv_cache()
        self.spill_cache = None
        if self.num_spill_blocks:
            # The slower tier: host memory (pinned, for fast copies) when the pool is on a GPU.
            self.spill_cache = torch.zeros((*self.kv_cache.shape[:2], self.num_spill_blocks, *self.kv_cache.shape[3:]),
                                           dtype=self.dtype, pin_memory=self.device.type == "cuda")
            logger.info("KV spill tier: %d blocks, %.1f MiB", self.num_spill_blocks,
                        self.spill_cache.numel() * self.spill_cache.element_size() / 2**20)
        self.sampler = Sampler()
        self.verifier = Verifier(self.sampler, self.vocab_size, lambda t: self._text(t))
        # The running sequences' block tables, kept across steps on every rank; rank 0 also
        # tracks what the ranks know, to send them only the changes.
        self.batch = PersistentBatch(self.block_size)
        self.differ = BatchDiffer()
        self.generator = torch.Generator().manual_seed(model_config.seed)
        self.token_text: Optional[Callable[[int], str]] = None  # set by the engine when it has a tokenizer

    @property
    def weight_bytes(self) -> int:
        return self.cost.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token

    def _num_blocks(self, cache: CacheConfig, sched: SchedulerConfig) -> int:
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        # A block here is a block of this pool plus, with a draft model, its twin in the draft's
        # pool; kv_cache_memory_bytes holds both pools, a free-memory budget also the draft's weights.
        draft_weights, draft_kv = (self.companion.weight_bytes, self.companion.kv_bytes_per_token) \
            if self.companion is not None else (0, 0)
        per_block = (self.kv_bytes_per_token + draft_kv) * self.block_size
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(min(free, total * _CUDA_MEMORY_FRACTION)) - _CUDA_ACTIVATION_RESERVE - draft_weights
        else:
            # No point holding more than max_num_seqs full-length sequences could ever use.
            most = sched.max_num_seqs * (-(-sched.max_model_len // self.block_size)) * per_block
            # Ranks on one machine share its RAM. The draft loads after this pool is sized, so
            # its weights come off the free RAM before the share is taken, as the target's did.
            share = _CPU_MEMORY_FRACTION / get_parallel_state().world_size
            budget = min(int((_available_ram() - draft_weights) * share), most)
        return max(0, int(budget // per_block))  # checked once every rank has agreed (see __init__)

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

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, banned: dict[int, list[int]],
                grammars: Optional[dict[int, GrammarState]] = None) -> dict[int, list[SampledToken]]:
        """Rank 0: run one step on every rank, then sample. Returns the sampled tokens of every
        sequence that finished its prompt/chunk: one, or for a sequence that verified proposed
        tokens, the accepted ones and the token after them. `banned` and `grammars` (by seq id)
        constrain what each sequence may sample."""
        start_time = time.perf_counter()
        chunks = [(seq.num_computed_tokens, n) for seq, n in sched.scheduled]
        seqs, logits, num_drafts = self.forward(sched)
        if not seqs:
            self.meter.record(*self.cost.step(chunks, 0), time.perf_counter() - start_time)
            return {}
        grammars = grammars or {}
        firsts = [0]
        for k in num_drafts:
            firsts.append(firsts[-1] + k + 1)
        plain = [j for j, k in enumerate(num_drafts) if k == 0]
        result = self._sample(logits[[firsts[j] for j in plain]] if len(plain) < len(seqs) else logits,
                              [seqs[j] for j in plain], banned, grammars) if plain else {}
        spec = [j for j, k in enumerate(num_drafts) if k > 0]
        if spec:
            result.update(self.verifier.verify(logits, [(seqs[j], firsts[j], num_drafts[j]) for j in spec],
                                               banned, grammars, self.generator))
        self.meter.record(*self.cost.step(chunks, logits.shape[0]), time.perf_counter() - start_time)
        return result

    def forward(self, sched: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor, list[int]]:
        """Rank 0: the step's forward on every rank. Returns the sequences that sample, their
        logits (1 + k rows for a sequence verifying k proposed tokens) and each one's k."""
        step = build_step(self.differ, sched.scheduled, sched.block_copies, get_parallel_state().pp_size)
        all_logits = self.executor.execute(step, self.run) if self.executor is not None else self.run(step)
        rows: list[torch.Tensor] = []
        num_drafts: list[int] = []
        for mb, logits in zip(step.micro_batches, all_logits):
            self._prompt_logprobs(mb, logits)
            if mb.sampled:
                rows.append(logits[[r + j for r, k in zip(mb.sample_rows, mb.num_drafts) for j in range(k + 1)]])
                num_drafts.extend(mb.num_drafts)
        seqs = sampled_seqs(step)
        return seqs, (torch.cat(rows) if rows else torch.empty(0, self.vocab_size)), num_drafts

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], banned: dict[int, list[int]],
                grammars: dict[int, GrammarState]) -> dict[int, list[SampledToken]]:
        """One token for each of seqs, from its row of logits."""
        # Token histories are copied only when a penalty reads them (else O(context) per step).
        history = any(s.params.needs_penalties for s in seqs)
        out = self.sampler(logits, [s.params for s in seqs],
                           [s.token_ids[:s.num_prompt_tokens] for s in seqs] if history else None,
                           [s.output_token_ids for s in seqs] if history else None, [s.generator for s in seqs],
                           [banned.get(s.seq_id, []) for s in seqs], self.generator,
                           batch_bitmask([grammars.get(s.seq_id) for s in seqs], self.vocab_size)
                           if grammars else None)
        result = {}
        for j, seq in enumerate(seqs):
            top = None
            if seq.params.logprobs is not None:
                top = {out.token_ids[j]: Logprob(out.logprobs[j], out.ranks[j], self._text(out.token_ids[j]))}
                for r in range(seq.params.logprobs):
                    tid = int(out.top_ids[j, r])
                    if tid not in top:
                        top[tid] = Logprob(float(out.top_logprobs[j, r]), r + 1, self._text(tid))
            result[seq.seq_id] = [SampledToken(out.token_ids[j], out.logprobs[j], top)]
        return result

    @torch.inference_mode()
    def run(self, step: StepInput) -> list[Optional[torch.Tensor]]:
        """Every rank: the forward of each micro-batch. Returns, on rank 0, each micro-batch's
        logits for its logits_rows (None where it has none)."""
        self._copy_blocks(step.block_copies)
        self.batch.apply(step.diff)
        ps = get_parallel_state()
        results: list[Optional[torch.Tensor]] = []
        pending = []  # sends in flight, with the tensors they read
        for mb in step.micro_batches:
            mb = model_input(self.batch, mb, self.device)
            hidden_in = None
            if not ps.is_first_stage:
                hidden_in = torch.empty(mb.input_ids.shape[0], self.hidden_size, dtype=self.dtype, device=self.device)
                dist.recv(hidden_in, src=ps.stage_rank(ps.pp_rank - 1))
            set_attention_context(mb.attention)
            try:
                hidden = self.model(mb.input_ids, mb.positions, hidden_in)
            finally:
                set_attention_context(None)
            if not ps.is_last_stage:
                # Sent while the next micro-batch is computed: that is the pipeline's overlap.
                hidden = hidden.contiguous()
                pending.append((dist.isend(hidden, dst=ps.stage_rank(ps.pp_rank + 1)), hidden))
                continue
            logits = self.model.compute_logits(hidden[mb.logits_rows]) if len(mb.logits_rows) else None
            if ps.rank == 0:
                results.append(logits)
            elif logits is not None and ps.tp_rank == 0:
                logits = logits.contiguous()
                pending.append((dist.isend(logits, dst=0), logits))
        for work, _ in pending:
            work.wait()
        if ps.rank == 0 and not ps.is_last_stage:  # the last stage sends the logits back
            for mb in step.micro_batches:
                logits = None
                if len(mb.logits_rows):
                    logits = torch.empty(len(mb.logits_rows), self.vocab_size, dtype=self.dtype, device=self.device)
                    dist.recv(logits, src=ps.stage_rank(ps.pp_size - 1, 0))
                results.append(logits)
        return results

    def _copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Move blocks between the pool and the spill tier, in the order the block manager asked."""
        for direction, src, dst in copies:
            if direction == "out":
                self.spill_cache[:, :, dst].copy_(self.kv_cache[:, :, src], non_blocking=True)
            else:
                self.kv_cache[:, :, dst].copy_(self.spill_cache[:, :, src], non_blocking=True)
        if copies and self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # a spill block may be reused right after

    def _text(self, token_id: int) -> Optional[str]:
        return self.token_text(token_id) if self.token_text is not None else None

    def _prompt_logprobs(self, mb: MicroBatch, logits: Optional[torch.Tensor]) -> None:
        """Fill request.prompt_logprobs for the prompt positions computed in this micro-batch."""
        for seq, _ in mb.ordered:
            if seq.seq_id not in mb.prompt_rows:
                continue
            req = seq.request
            row, first, last = mb.prompt_rows[seq.seq_id]
            lp = logits[row:row + last - first].float().log_softmax(-1)
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
