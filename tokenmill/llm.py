"""The offline API, mirroring vLLM's `LLM` so users' code carries over."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence, Union

from tqdm import tqdm

from tokenmill.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig
from tokenmill.engine.batch_limits import resolve_scheduler_limits
from tokenmill.engine.llm_engine import LLMEngine, PromptType
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.draft_model import draft_cost
from tokenmill.tokenizer import chat_template_ids

logger = logging.getLogger(__name__)


class LLM:
    """Generate text from a local Hugging Face checkpoint.

    Args:
        model: path to a checkpoint folder (config.json, safetensors or .bin, tokenizer files).
        dtype: "auto", "float32", "bfloat16" or "float16" (see README for what "auto" picks).
        max_model_len: longest prompt + output; None takes the checkpoint's limit.
        max_num_seqs: most sequences in one batch; None chooses it from the device's roofline (the
            decode batch where the weight matmuls turn compute-bound, capped by the KV pool).
        max_num_batched_tokens: token budget per step; long prompts are prefilled in chunks. None
            chooses it from the roofline (twice the prefill chunk that turns compute-bound).
        block_size: tokens per KV block.
        kv_cache_memory_bytes: bytes for the KV pool; None sizes it from free memory.
        seed: seed of the engine's generator for unseeded sampling.
        enable_prefix_caching: reuse cached KV of earlier prompts' prefixes (on by default).
        swap_space: GiB of the spill tier for evicted cached blocks (0: off), as in vLLM.
        tensor_parallel_size: ranks each layer is split over (one process each).
        pipeline_parallel_size: stages the layers are split into (one process per rank each).
        distributed_timeout_seconds: how long a rank waits on a peer before the engine fails.
        linear_backend: "auto" (time the kernels on this machine, pick per shape and batch size),
            or "aten", "onednn", "tokenmill" to force one.
        speculative_config: speculative decoding, as vLLM's: {"method": "ngram",
            "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b}, a draft
            checkpoint {"model": PATH, "num_speculative_tokens": k}, or "method": "auto" to
            propose only while the roofline says it pays (docs/speculative-decoding.md).
        scheduling_policy: "fcfs" (first come, first served) or "priority": each request's
            priority (generate(priority=...), lower first) orders the queue and preempts.
    """

    def __init__(self, model: str, dtype: str = "auto", max_model_len: Optional[int] = None,
                 max_num_seqs: Optional[int] = None, max_num_batched_tokens: Optional[int] = None, block_size: int = 16,
                 kv_cache_memory_bytes: Optional[int] = None, seed: int = 0, device: Optional[str] = None,
                 skip_tokenizer_init: bool = False, num_gpu_blocks_override: Optional[int] = None,
                 enable_prefix_caching: bool = True, swap_space: float = 0,
                 spill_link_bandwidth: Optional[float] = None, spill_device_flops: Optional[float] = None,
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 distributed_timeout_seconds: float = 120.0, linear_backend: str = "auto",
                 speculative_config: Optional[Union[dict[str, Any], SpeculativeConfig]] = None,
                 scheduling_policy: str = "fcfs") -> None:
        model_config = ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed,
                                   device=device, skip_tokenizer_init=skip_tokenizer_init,
                                   linear_backend=linear_backend)
        cache_config = CacheConfig(block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                                   num_gpu_blocks_override=num_gpu_blocks_override,
                                   enable_prefix_caching=enable_prefix_caching, swap_space=swap_space,
                                   spill_link_bandwidth=spill_link_bandwidth, spill_device_flops=spill_device_flops)
        scheduler_config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                           max_model_len=model_config.max_model_len,
                                           scheduling_policy=scheduling_policy)
        parallel_config = ParallelConfig(tensor_parallel_size=tensor_parallel_size,
                                         pipeline_parallel_size=pipeline_parallel_size,
                                         distributed_timeout_seconds=distributed_timeout_seconds)
        # Before the engine: the KV pool's size on CPU depends on max_num_seqs.
        spec = SpeculativeConfig.parse(speculative_config)
        resolve_scheduler_limits(scheduler_config, model_config, cache_config, parallel_config,
                                 draft_cost(spec, model_config.torch_dtype) if spec is not None else None)
        self.llm_engine = LLMEngine(model_config, cache_config, scheduler_config, parallel_config, spec)

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor/pipeline-parallel engine. Also done on leaving a
        `with LLM(...) as llm:` block, when the object is deleted, and at exit, so that a script
        can build another LLM afterwards."""
        self.llm_engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        engine = getattr(self, "llm_engine", None)  # absent when __init__ failed
        if engine is not None:
            try:
                engine.shutdown()
            except Exception as e:  # a finalizer must not raise; say why the workers may linger
                logger.warning("could not stop the engine's workers: %s", e)

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True, priority: Optional[list[int]] = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched continuously; outputs in prompt order.
        `priority`: one per prompt, lower first (needs scheduling_policy="priority")."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        engine = self.llm_engine
        # Validate everything first, so a bad prompt is refused before any work starts.
        ids = []
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                if isinstance(sp, SamplingParams):  # only the final output is read here (as vLLM does)
                    sp = dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(engine.add_request(p, sp, priority=priority[i] if priority is not None else 0))
        except ValueError:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    def chat(self, messages: Union[list[dict[str, str]], list[list[dict[str, str]]]],
             sampling_params: Optional[SamplingParams] = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one or many conversations and generate."""
        tok = self.llm_engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            if not conv:
                raise ValueError("a conversation needs at least one message")
            for m in conv:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
            prompts.append({"prompt_token_ids": chat_template_ids(tok, conv, add_generation_prompt)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
