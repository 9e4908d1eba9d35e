"""A smaller checkpoint with the target's vocabulary proposes k tokens by decoding them itself.

The draft has its own model runner, paged KV pool and block manager on the same device. Under
tensor or pipeline parallelism it runs whole in rank 0, the engine's process (as vLLM's draft at
draft_tensor_parallel_size 1): a small model is not worth splitting, and its proposals are only
token ids, which reach the other ranks with the step like any other token. Each
target sequence has a mirror on the draft side: the same tokens, plus the draft's own KV. Before
proposing, a mirror catches up with what the target accepted since (its KV is kept up to the
longest prefix it shares with the target's tokens; rejected proposals' slots are written over),
then the draft decodes k tokens for every mirror at once, one batched forward per token. For a
sampled request each proposal is drawn from the draft's distribution q (the request's
temperature, top_k, top_p, min_p and logit_bias applied), and q goes with it to the verifier.

A mirror whose sequence left the running batch (finished, aborted or preempted) is freed; when
the draft's pool is full a mirror is dropped and its sequence decodes plainly.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from tokenmill.config import CacheConfig, ModelConfig, SchedulerConfig
from tokenmill.distributed.parallel_state import single_process
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.layers.sampler import exponential_noise
from tokenmill.model_cost import ModelCost, ModelShape
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.config import SpeculativeConfig

logger = logging.getLogger(__name__)


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, target: ModelConfig, cache: CacheConfig,
                 scheduler: SchedulerConfig, target_runner: Any) -> None:
        from tokenmill.engine.model_runner import ModelRunner  # the runner imports this package

        assert config.model is not None
        self.model_config = ModelConfig(model=config.model, dtype=str(target.torch_dtype).replace("torch.", ""),
                                        max_model_len=min(target.max_model_len, _max_len(config.model)),
                                        seed=target.seed, device=str(target.torch_device), skip_tokenizer_init=True,
                                        linear_backend=target.linear_backend)
        vocab, target_vocab = self.model_config.hf_config.vocab_size, target.hf_config.vocab_size
        if vocab != target_vocab:
            raise ValueError(f"the draft model's vocabulary ({vocab} tokens) differs from the target's "
                             f"({target_vocab}): a draft must share the target's tokenizer")
        # As many blocks as the target's pool (the draft's are smaller), no spill tier.
        draft_cache = dataclasses.replace(cache, swap_space=0, num_gpu_blocks_override=target_runner.num_blocks,
                                          kv_cache_memory_bytes=None)
        with single_process():  # whole on rank 0, beside the target's shard when that is split
            self.runner = ModelRunner(self.model_config, draft_cache, scheduler, executor=None)
        self.block_manager = BlockManager(self.runner.num_blocks, draft_cache.block_size, enable_prefix_caching=False)
        self.cost = self.runner.cost
        self.mirrors: dict[int, Sequence] = {}  # by the target sequence's id
        self.owner: dict[int, int] = {}  # mirror seq id -> target seq id
        self.base: dict[int, int] = {}  # mirror seq id -> target tokens when it last proposed
        self.generator = torch.Generator().manual_seed(target.seed + 1)
        self.max_num_batched_tokens = scheduler.max_num_batched_tokens
        logger.info("draft model %s: %.1f MiB of weights, %d KV blocks", config.model,
                    self.runner.weight_bytes / 2**20, self.runner.num_blocks)

    def _mirror(self, seq: Sequence) -> Sequence:
        """The draft's copy of seq, its tokens brought up to date. Its KV stays valid up to the
        longest prefix the old and new tokens share: only what follows the tokens it last
        proposed after can differ (proposals the target rejected)."""
        mirror = self.mirrors.get(seq.seq_id)
        if mirror is None:
            mirror = Request(f"draft-{seq.seq_id}", None, list(seq.token_ids), SamplingParams()).seqs[0]
            self.mirrors[seq.seq_id] = mirror
            self.owner[mirror.seq_id] = seq.seq_id
            return mirror
        old, new, shared = mirror.token_ids, seq.token_ids, self.base[mirror.seq_id]
        while shared < min(len(old), len(new)) and old[shared] == new[shared]:
            shared += 1
        mirror.token_ids = old[:shared] + new[shared:]
        # At least the last token is computed again: its logits give the first proposal.
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, shared, mirror.num_tokens - 1)
        return mirror

    def release(self, keep: set[int]) -> None:
        """Free the mirrors of sequences not in `keep` (finished, aborted, preempted)."""
        for seq_id in [i for i in self.mirrors if i not in keep]:
            self._drop(seq_id)

    def _drop(self, seq_id: int) -> None:
        mirror = self.mirrors.pop(seq_id)
        self.owner.pop(mirror.seq_id, None)
        self.base.pop(mirror.seq_id, None)
        self.block_manager.free(mirror)

    def _catch_up(self, mirrors: list[Sequence]) -> None:
        """While the mirrors' catch-up (a new mirror's whole prompt) is more than a target step
        may compute, run it in chunks of the step's token budget up to each mirror's last token,
        so no draft forward is larger than a target step (activations, step time)."""
        budget = self.max_num_batched_tokens
        while sum(m.num_tokens - m.num_computed_tokens for m in mirrors if m.seq_id in self.owner) > budget:
            sched, left = SchedulerOutput(), budget
            for m in mirrors:
                n = min(m.num_tokens - m.num_computed_tokens - 1, left)  # the last token: for proposing
                if n <= 0 or m.seq_id not in self.owner:
                    continue
                if not self.block_manager.allocate_slots(m, n):
                    logger.debug("draft KV pool full: no proposal for sequence %d", self.owner[m.seq_id])
                    self._drop(self.owner[m.seq_id])
                    continue
                sched.scheduled.append((m, n))
                left -= n
                if left <= 0:
                    break
            if not sched.scheduled:
                return
            sched.num_batched_tokens = budget - left
            with single_process():
                self.runner.forward(sched)
            for m, n in sched.scheduled:
                m.num_computed_tokens += n

    def _forward(self, mirrors: list[Sequence]) -> tuple[list[Sequence], Optional[torch.Tensor]]:
        """One draft forward: each mirror computes its tokens without KV (a catch-up, or the
        last proposal). Mirrors the pool cannot hold are dropped. Returns the ones that ran and
        their last-position logits."""
        sched = SchedulerOutput()
        for m in mirrors:
            n = m.num_tokens - m.num_computed_tokens
            if self.block_manager.allocate_slots(m, n):
                sched.scheduled.append((m, n))
            else:
                logger.debug("draft KV pool full: no proposal for sequence %d", self.owner[m.seq_id])
                self._drop(self.owner[m.seq_id])
        if not sched.scheduled:
            return [], None
        sched.num_batched_tokens = sum(n for _, n in sched.scheduled)
        with single_process():
            ran, logits, _ = self.runner.forward(sched)
        for m, n in sched.scheduled:
            m.num_computed_tokens += n
        return ran, logits

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], budgets: list[int]) -> None:
        """Set each seq's spec_token_ids (up to its budget) and, when it samples, spec_probs."""
        room = self.model_config.max_model_len
        wanted = {s.seq_id: b for s, b in zip(seqs, budgets) if s.num_tokens + b <= room}
        target = {s.seq_id: s for s in seqs if s.seq_id in wanted}
        drafts: dict[int, list[int]] = {i: [] for i in wanted}
        dists: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
        # A seeded request's drafts draw the noise rows its own decode will take at those
        # positions (rejection.py: the coupling), from a copy: its generator advances only
        # with the tokens it emits.
        noise_from = {i: _copy(s.generator) for i, s in target.items() if s.generator is not None}
        active = [self._mirror(s) for s in target.values()]
        for m in active:
            self.base[m.seq_id] = len(target[self.owner[m.seq_id]].token_ids)
        self._catch_up(active)
        active = [m for m in active if m.seq_id in self.owner]  # not dropped for want of blocks
        for _ in range(max(wanted.values(), default=0)):
            ran, logits = self._forward(active)
            if logits is None:
                break
            owners = [target[self.owner[m.seq_id]] for m in ran]
            processed = self.runner.sampler.prepare(logits, [s.params for s in owners], None, None, [[]] * len(ran))[1]
            active = []
            for j, (m, seq) in enumerate(zip(ran, owners)):
                if seq.params.greedy:
                    token = int(processed[j].argmax())
                else:
                    q = self.runner.sampler.probs(processed[j:j + 1], [seq.params])[0].cpu()
                    noise = exponential_noise((1, q.shape[0]), [noise_from.get(seq.seq_id)], self.generator)[0]
                    token = int((q / noise).argmax())
                    dists[seq.seq_id].append(q)
                drafts[seq.seq_id].append(token)
                m.token_ids.append(token)
                if len(drafts[seq.seq_id]) < wanted[seq.seq_id]:
                    active.append(m)
            if not active:
                break
        for seq_id, seq in target.items():
            if seq_id in self.mirrors:  # not dropped for want of blocks
                seq.spec_token_ids = drafts[seq_id]
                seq.spec_probs = torch.stack(dists[seq_id]) if dists[seq_id] else None

    def has_mirror(self, seq: Sequence) -> bool:
        return seq.seq_id in self.mirrors

    def catch_up_tokens(self, seqs: list[Sequence]) -> list[int]:
        """Tokens each seq's mirror must compute before it proposes: the whole sequence for a new
        one, else those after what the draft last proposed from (the accepted tokens and one)."""
        out = []
        for seq in seqs:
            mirror = self.mirrors.get(seq.seq_id)
            out.append(seq.num_tokens if mirror is None else max(1, seq.num_tokens - self.base[mirror.seq_id] + 1))
        return out

    def roofline_seconds(self, chunks: list[tuple[int, int]], peak_flops: float, peak_bandwidth: float) -> float:
        """The draft's roofline time for one forward over chunks ((context, new tokens) each)."""
        flops, nbytes = self.cost.step(chunks, len(chunks))
        return max(flops / peak_flops, nbytes / peak_bandwidth)


def _copy(generator: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def _max_len(path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)


def draft_cost(config: SpeculativeConfig, dtype: torch.dtype) -> Optional[ModelCost]:
    """The draft model's cost read from its config.json, before either model loads, so that the
    target's KV pool leaves room for the draft's weights and pool (None when there is no draft or
    its config has no shape the roofline can read: the pool is then sized as without a draft)."""
    if config.model is None:
        return None
    from transformers import AutoConfig

    try:
        return ModelShape.from_hf_config(AutoConfig.from_pretrained(config.model)).cost(str(dtype).replace("torch.", ""))
    except ValueError as e:
        logger.warning("draft model %s: no cost from its config (%s); the KV pool does not reserve its memory",
                       config.model, e)
        return None
