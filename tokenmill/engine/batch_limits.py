"""Default batch limits from the roofline, when `max_num_seqs` / `max_num_batched_tokens` are not given.

One decode step at batch B reads every weight once and does ~2 * params FLOPs per sequence, so
its weight GEMMs have arithmetic intensity ~B * 2 * params / weight_bytes: it grows with B until
it crosses the device's ridge (peak FLOP/s / bandwidth) at B*, where the GEMMs turn compute-bound
and a bigger batch adds time about as fast as it adds tokens. Attention is left out of the
crossing on purpose: each sequence reads its own KV, so its intensity does not grow with the
batch, and it costs the same time per sequence at any B. Tokens/s therefore rises with B and
levels off past B*; a batch well past it only costs step latency and KV memory. The batch is
taken where tokens/s reaches 90% of its level (EFFICIENCY, with STEP_OVERHEAD), capped by how
many sequences the KV pool holds; the same rule for a prefill chunk (one sequence, n tokens)
sizes the token budget.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional

from tokenmill.model_cost import ModelCost, ModelShape

logger = logging.getLogger(__name__)

MAX_SEQS = 1024  # the largest batch chosen by default: past it, step latency, not throughput, rules
SEQS_MULTIPLE = 8  # GEMM kernels tile rows by multiples of 8 (tensor-core MMA, CPU micro-kernels): a partial tile costs a whole one
# The roofline's corner is sharp only if a step overlaps its memory time with its arithmetic
# perfectly. With no overlap (time = t_mem + B * t_flop), batch B gets B / (B + B_c) of the
# compute-bound tokens/s, B_c = t_mem / t_flop. CPU decode steps fit that: llama-100m, fp32, one
# thread, 38, 55, 173, 308 ms at B = 1, 8, 32, 64. A batch (or prefill chunk) is sized to reach
# EFFICIENCY of the compute-bound rate under that pessimistic bound, B = B_c * 0.9 / 0.1; a
# device that overlaps well gets there sooner, and the larger batch only costs it latency.
EFFICIENCY = 0.9
# t_mem is more than the weights at peak bandwidth (which gives the roofline's B_c = B*): host
# work per step (scheduling, inputs, sampling) and bandwidth attained below the probe's. The fit
# above has t_mem ~37 ms against a ~23 ms weight read; bench throughput's single stream ran at
# 36-75% of the bandwidth bound on a 2-core EPYC (docs/benchmarks.md). So t_mem is taken as twice
# the weight read. (Without this, 9 x B* chose 48 on this CPU, and bench throughput ran ~5%
# slower than at 64: the fitted B_c is ~9, the roofline's B* ~5.)
STEP_OVERHEAD = 2.0
FALLBACK_SEQS = 64  # the fixed default before these rules, for a config whose cost cannot be read
# Below a few hundred tokens a step's fixed cost (scheduling, launches, sampling), which the
# roofline does not see, is a large share of it; 512 was vLLM's smallest default budget.
MIN_BATCHED_TOKENS = 512


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int
    max_num_batched_tokens: int
    peak_flops: float
    peak_bandwidth: float
    ridge: float  # FLOP/byte where a kernel turns compute-bound on this device
    compute_bound_batch: float  # decode batch B* where the weight GEMMs reach the ridge (unrounded)
    efficient_batch: float  # the batch reaching EFFICIENCY of the compute-bound rate, overhead counted (unrounded)
    kv_pool_tokens: Optional[int]  # None: no cap (num_gpu_blocks_override, a test knob, or unknown)
    typical_context: int
    kv_cap: Optional[int]  # sequences of typical_context tokens the pool holds
    prefill_chunk: int  # prompt tokens whose prefill step reaches EFFICIENCY of the compute-bound rate

    def describe(self) -> str:
        pool = ("the KV pool does not cap it (num_gpu_blocks_override, or unknown)" if self.kv_cap is None else
                f"the KV pool ({self.kv_pool_tokens} tokens) holds {self.kv_cap} sequences of "
                f"{self.typical_context} tokens")
        eff = f"{100 * EFFICIENCY:.0f}%"
        return (f"max_num_seqs={self.max_num_seqs}: decode turns compute-bound at batch "
                f"{self.compute_bound_batch:.1f} (ridge {self.ridge:.1f} FLOP/byte = "
                f"{self.peak_flops / 1e9:.4g} GFLOP/s / {self.peak_bandwidth / 1e9:.4g} GB/s) and reaches "
                f"{eff} of its compute-bound tokens/s at batch {self.efficient_batch:.1f} (step time = "
                f"{STEP_OVERHEAD:g} x weight read + compute); {pool}; max_num_batched_tokens={self.max_num_batched_tokens}: "
                f"{self.max_num_seqs} decodes + a {self.prefill_chunk}-token prefill chunk ({eff} of "
                f"compute-bound), at least {MIN_BATCHED_TOKENS}")


def _chunk_reaching(cost: ModelCost, intensity: float, limit: int = 1 << 20) -> int:
    """Fewest prompt tokens n whose prefill step (one logit row) reaches this FLOP/byte: it rises
    with n (weights amortised over more rows, attention growing ~n^2), so bisect."""
    def reaches(n: int) -> bool:
        flops, nbytes = cost.step([(0, n)], 1)
        return flops >= intensity * nbytes
    if not reaches(limit):
        return limit
    lo, hi = 0, limit  # reaches(hi) holds, reaches(lo) does not (n=0 does no work)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def choose_limits(cost: ModelCost, peak_flops: float, peak_bandwidth: float, kv_pool_tokens: Optional[int],
                  typical_context: int, max_model_len: int, max_num_seqs: Optional[int] = None,
                  max_num_batched_tokens: Optional[int] = None) -> BatchLimits:
    """The roofline's limits; a given max_num_seqs / max_num_batched_tokens is kept as is."""
    if not (peak_flops > 0 and peak_bandwidth > 0):
        raise ValueError(f"peaks must be positive, got {peak_flops} FLOP/s and {peak_bandwidth} B/s")
    typical_context = max(1, min(typical_context, max_model_len))
    ridge = peak_flops / peak_bandwidth
    # The intensity a step is sized to reach: the sharp corner's, moved by the step overhead and the efficiency.
    target = ridge * STEP_OVERHEAD * EFFICIENCY / (1 - EFFICIENCY)
    # Weight GEMMs at batch B: B * flops_per_token(0) FLOPs over weight_bytes bytes, read once.
    compute_bound = ridge * cost.weight_bytes / cost.flops_per_token(0)
    efficient = target * cost.weight_bytes / cost.flops_per_token(0)
    kv_cap = None if kv_pool_tokens is None else max(1, kv_pool_tokens // typical_context)
    if max_num_seqs is None:
        # Round up: past the target, tokens/s hardly grows; short of it, it is lost.
        seqs = min(MAX_SEQS, SEQS_MULTIPLE * math.ceil(efficient / SEQS_MULTIPLE))
        if kv_cap is not None:
            # More running sequences than the pool holds at their typical length would only be preempted.
            seqs = min(seqs, kv_cap)
        if max_num_batched_tokens is not None:
            seqs = min(seqs, max_num_batched_tokens)  # each running decode needs a token of the budget
        max_num_seqs = max(1, seqs)
    chunk = _chunk_reaching(cost, target)
    if max_num_batched_tokens is None:
        # Room for every running decode and, beside them, a prompt chunk that is efficient on its
        # own: a budget of max_num_seqs alone would let a newly admitted prompt in a token at a time.
        # More than that only makes the steps that carry a prefill (and the decodes in them) slower.
        max_num_batched_tokens = max(max_num_seqs + chunk, MIN_BATCHED_TOKENS)
    return BatchLimits(max_num_seqs, max_num_batched_tokens, peak_flops, peak_bandwidth, ridge, compute_bound,
                       efficient, kv_pool_tokens, typical_context, kv_cap, chunk)


def _weight_bytes_if_quantized(shape: ModelShape, cost: ModelCost, hf_config: Any) -> int:
    """GPTQ checkpoints stream their linear layers at `bits` per weight (scales aside)."""
    q = getattr(hf_config, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if hasattr(q, "to_dict") else {})
    bits = q.get("bits")
    if not bits:
        return cost.weight_bytes
    per = cost.weight_bytes / shape.num_params
    return int((shape.num_params - cost.matmul_params) * per + cost.matmul_params * bits / 8)


def _kv_pool_tokens(cost: ModelCost, model_config: Any, cache_config: Any, world_size: int,
                    companion: Optional[ModelCost] = None) -> Optional[int]:
    """Tokens the KV pool will hold, before the model loads, by model_runner._num_blocks' rules
    (less its cap at max_num_seqs full sequences on CPU, which is what is being chosen here).
    Each rank holds ~1/world_size of every token's KV (its heads or its layers); a draft model
    (`companion`, whole on rank 0) takes its weights and its KV per token from the same budget."""
    import torch

    from tokenmill.engine import model_runner as mr

    if cache_config.num_gpu_blocks_override is not None:
        return None  # vLLM's knob for testing preemption: capping the batch by it would defeat it
    draft_weights, draft_kv = (companion.weight_bytes, companion.kv_bytes_per_token) if companion else (0, 0)
    per_rank_token = max(1, cost.kv_bytes_per_token // world_size + draft_kv)
    if cache_config.kv_cache_memory_bytes is not None:
        budget = cache_config.kv_cache_memory_bytes
    elif model_config.torch_device.type == "cuda":
        free, total = torch.cuda.mem_get_info(model_config.torch_device)
        budget = int(min(free, total * mr._CUDA_MEMORY_FRACTION)) - mr._CUDA_ACTIVATION_RESERVE \
            - cost.weight_bytes // world_size - draft_weights  # the weights are not loaded yet
    else:
        budget = int((mr._available_ram() - draft_weights) * mr._CPU_MEMORY_FRACTION / world_size)
    return max(0, budget // per_rank_token)


def resolve_scheduler_limits(scheduler_config: Any, model_config: Any, cache_config: Any,
                             parallel_config: Any = None, companion: Optional[ModelCost] = None
                             ) -> Optional[BatchLimits]:
    """Fill the scheduler's max_num_seqs / max_num_batched_tokens left None, in place, and log why.
    Explicit values win; with both given nothing is probed. Returns the choice (None if none made).
    `companion` is a draft model's cost, whose memory the KV pool leaves free."""
    sc = scheduler_config
    if sc.max_num_seqs is not None and sc.max_num_batched_tokens is not None:
        return None
    from tokenmill.devices import peaks

    dtype = str(model_config.torch_dtype).replace("torch.", "")
    try:
        shape = ModelShape.from_hf_config(model_config.hf_config)
        cost = shape.cost(dtype)
    except ValueError as e:  # a config model_cost cannot read: the engine still runs, on fixed limits
        sc.max_num_seqs = sc.max_num_seqs or FALLBACK_SEQS
        sc.max_num_batched_tokens = sc.max_num_batched_tokens or max(sc.max_num_seqs, 2048, sc.max_model_len)
        logger.warning("batch limits: no roofline for %s (%s); max_num_seqs=%d, max_num_batched_tokens=%d",
                       model_config.model, e, sc.max_num_seqs, sc.max_num_batched_tokens)
        return None
    cost = dataclasses.replace(cost, weight_bytes=_weight_bytes_if_quantized(shape, cost, model_config.hf_config))
    world = parallel_config.world_size if parallel_config is not None else 1
    flops, bandwidth = peaks(model_config.torch_device, model_config.torch_dtype)
    # Over continuous batching, sequences are at every point between their prompt and their end,
    # so one that may grow to max_model_len holds about half of it on average.
    typical = max(1, sc.max_model_len // 2)
    limits = choose_limits(cost, flops, bandwidth, _kv_pool_tokens(cost, model_config, cache_config, world, companion), typical,
                           sc.max_model_len, sc.max_num_seqs, sc.max_num_batched_tokens)
    given = [n for n in ("max_num_seqs", "max_num_batched_tokens") if getattr(sc, n) is not None]
    sc.max_num_seqs, sc.max_num_batched_tokens = limits.max_num_seqs, limits.max_num_batched_tokens
    logger.info("batch limits from the roofline of %s (%s)%s: %s", model_config.model, dtype,
                f"; {' and '.join(given)} as given" if given else "", limits.describe())
    return limits
