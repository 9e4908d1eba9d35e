"""The engine: requests in, one scheduling + model step at a time, RequestOutputs out."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any, Optional, Union

from tokenmill.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, eos_token_ids
from tokenmill.devices import peaks
from tokenmill.distributed.parallel_state import get_parallel_state
from tokenmill.engine.batch_limits import resolve_scheduler_limits
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.kv_tiers import SpillCostModel
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.request_validation import InvalidRequest, RequestValidator
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request
from tokenmill.engine.stats import EngineStats
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.tokenizer import load_tokenizer
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.draft_model import draft_cost
from tokenmill.spec_decode.speculator import Speculator, make_speculator
from tokenmill.structured.grammars import GrammarCache, GrammarMatchesNothing
from tokenmill.structured.matcher import GrammarState
from tokenmill.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

PromptType = Union[str, dict[str, Any]]


def _generation_config(model_path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):  # no generation_config.json: the other sources decide
        return None


class LLMEngine:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 scheduler_config: SchedulerConfig, parallel_config: Optional[ParallelConfig] = None,
                 speculative_config: Optional[SpeculativeConfig] = None) -> None:
        self.model_config = model_config
        self.speculative_config = speculative_config
        self.scheduler_config = scheduler_config
        self.parallel_config = parallel_config or ParallelConfig()
        # A draft model's weights and KV come out of the target's KV budget.
        self.draft_cost = draft_cost(speculative_config, model_config.torch_dtype) \
            if speculative_config is not None else None
        # Limits left None are chosen from the roofline (a no-op when LLM() already did).
        resolve_scheduler_limits(scheduler_config, model_config, cache_config, self.parallel_config, self.draft_cost)
        if get_parallel_state().world_size > 1:
            raise ValueError("a tensor/pipeline-parallel engine is already running in this process; "
                             "shut it down first (LLM.shutdown())")
        self.executor = None
        if self.parallel_config.world_size > 1:
            from tokenmill.distributed.executor import MultiprocExecutor

            # Under torchrun, ranks other than 0 become model workers here and never return.
            self.executor = MultiprocExecutor(self.parallel_config, model_config, cache_config, scheduler_config)
        try:
            self._init(model_config, cache_config, scheduler_config)
        except BaseException:
            if self.executor is not None:  # the workers may be anywhere in their start-up: stop them hard
                self.executor.shutdown(graceful=False)
            raise
        if self.executor is not None:
            self.executor.ready = True  # every rank is in its step loop

    def _init(self, model_config: ModelConfig, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
        self.tokenizer = None
        if not model_config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(model_config.model)
        self.model_runner = ModelRunner(model_config, cache_config, scheduler_config, self.executor, self.draft_cost)
        if self.tokenizer is not None:
            tok = self.tokenizer
            self.model_runner.token_text = lambda t: tok.decode([t])
        runner = self.model_runner
        cuda = runner.device.type == "cuda"
        cost = SpillCostModel(
            kv_bytes_per_token=runner.cost.kv_bytes_per_token, flops_per_token=runner.cost.flops_per_token(),
            link_bandwidth=cache_config.spill_link_bandwidth or (25e9 if cuda else 10e9),
            device_flops=cache_config.spill_device_flops or (1e14 if cuda else 1e11))
        self.block_manager = BlockManager(runner.num_blocks, cache_config.block_size,
                                          enable_prefix_caching=cache_config.enable_prefix_caching,
                                          num_spill_blocks=runner.num_spill_blocks, cost_model=cost)
        self.eos_token_ids = eos_token_ids(_generation_config(model_config.model), model_config.hf_config,
                                           self.tokenizer)
        self.scheduler = Scheduler(scheduler_config, self.block_manager, self.eos_token_ids)
        self.validator = RequestValidator(model_config.hf_config.vocab_size, scheduler_config.max_model_len,
                                          self.block_manager.num_blocks * self.block_manager.block_size)
        self.requests: dict[str, Request] = {}
        self._grammars: Optional[GrammarCache] = None  # built on the first constrained request
        self._grammars_lock = threading.Lock()
        self._compiling: list[Request] = []  # constrained requests whose grammar is compiling
        self._failed: list[Request] = []  # failed by the engine, to report in the next step
        self.stats = EngineStats(kv_blocks_total=self.block_manager.num_blocks,
                                 spill_blocks_total=runner.num_spill_blocks)
        self.speculator: Optional[Speculator] = None
        if self.speculative_config is not None:
            self.speculator = make_speculator(self.speculative_config, model_config, cache_config, scheduler_config,
                                              runner)
            self.stats.spec_decode = self.speculator.stats
        self._next_id = 0

    # -- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string or a dict, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (skip_tokenizer_init); pass prompt_token_ids")
        return prompt, self.tokenizer.encode(prompt)

    def add_request(self, prompt: PromptType, params: SamplingParams, request_id: Optional[str] = None,
                    priority: int = 0) -> str:
        """Validate, tokenize and queue a request. Raises ValueError naming what is wrong.
        `priority` (lower runs first) needs scheduling_policy "priority", as in vLLM."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if priority != 0 and self.scheduler_config.scheduling_policy != "priority":
            raise ValueError(f"got priority {priority}, but priority scheduling is off (--scheduling-policy priority)")
        text, ids = self.tokenize(prompt)
        self.validator.check(ids, params)
        grammar = None
        if params.structured_outputs is not None:
            self.check_structured_outputs(params.structured_outputs)
            grammar = self.grammars.submit(params.structured_outputs)
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, text, ids, params, priority)
        for seq in req.seqs:
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                                         params.stop_strings, params.include_stop_str_in_output)
        self.requests[request_id] = req
        if grammar is None:
            for seq in req.seqs:
                self.scheduler.add(seq)
        else:
            # Scheduled once its grammar is compiled (at once when an earlier request compiled it).
            req.grammar_future = grammar
            self._compiling.append(req)
            self._admit_compiled()
        return request_id

    # -- structured outputs ---------------------------------------------------------------
    @property
    def grammars(self) -> GrammarCache:
        with self._grammars_lock:  # the server's thread checks requests while the engine's steps
            if self._grammars is None:
                if self.tokenizer is None:
                    raise InvalidRequest("structured_outputs need the tokenizer (skip_tokenizer_init is set)",
                                         "structured_outputs")
                self._grammars = GrammarCache(self.tokenizer, self.model_config.hf_config.vocab_size,
                                              sorted(self.eos_token_ids))
            return self._grammars

    def check_structured_outputs(self, so: StructuredOutputsParams) -> None:
        """InvalidRequest naming what the grammar engine cannot enforce. Cheap (no compiling),
        and safe to call from the server's thread."""
        try:
            self.grammars.check(so)
        except ValueError as e:
            raise InvalidRequest(str(e), "structured_outputs") from e

    @staticmethod
    def grammar_problem(compiled: Future) -> Optional[str]:
        """Why a compiled grammar (a done future) cannot constrain a request, or None."""
        error = compiled.exception()
        if isinstance(error, GrammarMatchesNothing):
            return f"structured_outputs: {error}"
        if error is not None:  # check() passed, so this is the grammar engine failing
            return f"structured_outputs: compiling the grammar failed: {error}"
        return None

    def _admit_compiled(self) -> None:
        """Hand the requests whose grammar is ready to the scheduler, a matcher per sequence."""
        for req in [r for r in self._compiling if r.grammar_future.done()]:
            self._compiling.remove(req)
            problem = self.grammar_problem(req.grammar_future)
            if problem:  # finished at once with the reason (the server turns it into an error)
                logger.warning("request %s: %s", req.request_id, problem)
                self.scheduler.abort(req.seqs, "error", problem)
                self._failed.append(req)
                continue
            for seq in req.seqs:
                seq.grammar = GrammarState(req.grammar_future.result(), self.grammars.stop_token_ids)
                self.scheduler.add(seq)

    @property
    def compiling(self) -> list[Request]:
        """Requests waiting for their grammar to compile (not yet in the scheduler)."""
        return list(self._compiling)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    def abort_request(self, request_ids: Union[str, list[str]]) -> None:
        """Stop requests now; their KV blocks go back to the pool at once."""
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                if req in self._compiling:
                    self._compiling.remove(req)
                self.scheduler.abort(req.seqs)
        if self.speculator is not None and self.speculator.draft is not None:
            self.speculator.draft.release({s.seq_id for s in self.scheduler.running})

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the other ranks of a tensor/pipeline-parallel engine (a no-op with one process).
        graceful=False kills them, for when a step may still be running."""
        if self.executor is not None:
            self.executor.shutdown(graceful)
        if self._grammars is not None:
            self._grammars.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling or self._failed)

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model, apply results; outputs of every request that progressed."""
        self._admit_compiled()
        sched = self.scheduler.schedule()
        if sched.is_empty and self._compiling:  # nothing to run but grammars: wait for one, run it now
            wait([r.grammar_future for r in self._compiling], timeout=0.05, return_when=FIRST_COMPLETED)
            self._admit_compiled()
            sched = self.scheduler.schedule()
        grammars = {s.seq_id: s.grammar for s, _ in sched.scheduled if s.grammar is not None}
        chunks = [(q.num_computed_tokens, n) for q, n in sched.scheduled]
        started = time.perf_counter()
        sampled = self.model_runner.execute(sched, self._banned(sched), grammars) if not sched.is_empty else {}
        # A pure decode step (each sequence computes its last token and its proposals) is what
        # "auto" measures its step times on; steps with prompt chunks cost otherwise.
        if self.speculator is not None and chunks and all(n == 1 + len(q.spec_token_ids) for q, n in sched.scheduled):
            self.speculator.observe_step(time.perf_counter() - started, chunks,
                                         sum(len(q.spec_token_ids) for q, _ in sched.scheduled))
        # Prompt positions computed this step (recomputation after preemption included).
        prompt_tokens = sum(max(0, min(q.num_computed_tokens + n, q.num_prompt_tokens) - q.num_computed_tokens)
                            for q, n in sched.scheduled)
        drafted = {s.seq_id: len(s.spec_token_ids) for s, _ in sched.scheduled if s.spec_token_ids}
        outputs_before = sum(s.num_output_tokens for s, _ in sched.scheduled)
        finished = self.scheduler.update(sched, sampled)
        # Tokens appended, not sampled: a verification's tokens past a stop are dropped.
        generated = sum(s.num_output_tokens for s, _ in sched.scheduled) - outputs_before
        if self.speculator is not None:
            self.speculator.record(drafted, sampled)
            self.speculator.propose(self.scheduler.running)  # for the next step
        self._failed.clear()  # reported with the finished ones
        self._update_stats(sched, generated, prompt_tokens)
        touched = {s.request.request_id: s.request for s, _ in sched.scheduled}
        touched.update({s.request.request_id: s.request for s in finished})
        outputs = []
        for rid, req in touched.items():
            if req.seqs[0].num_output_tokens and req.metrics.first_token_time is None:
                req.metrics.first_token_time = time.time()
            out = self._make_output(req)
            if out is not None:
                outputs.append(out)
            if req.finished:
                self.requests.pop(rid, None)
                self.stats.num_requests_finished += 1
        return outputs

    def _banned(self, sched) -> dict[int, list[int]]:
        """EOS and stop tokens are masked while a sequence is short of min_tokens."""
        banned = {}
        for seq, _ in sched.scheduled:
            p = seq.params
            if p.min_tokens and seq.num_output_tokens < p.min_tokens:
                banned[seq.seq_id] = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids))
        return banned

    def _update_stats(self, sched, num_sampled: int, prompt_tokens: int) -> None:
        s = self.stats
        s.num_steps += 1
        s.num_requests_running = len({q.request.request_id for q in self.scheduler.running})
        s.num_requests_waiting = len({q.request.request_id for q in self.scheduler.waiting})
        s.batch_num_seqs = len(sched.scheduled)
        s.batch_num_tokens = sched.num_batched_tokens
        bm = self.block_manager
        s.kv_blocks_used = bm.num_used_blocks
        s.kv_blocks_cached = bm.num_cached_blocks
        s.spill_blocks_used = bm.spill.num_used_blocks if bm.spill else 0
        c = bm.stats
        s.prefix_cache_queries, s.prefix_cache_hits, s.recomputed_tokens = c.queries, c.hits, c.recomputed_tokens
        s.evictions, s.swaps_in, s.swaps_out = c.evictions, c.swaps_in, c.swaps_out
        s.num_preemptions = self.scheduler.num_preemptions
        s.generation_tokens += num_sampled
        s.prompt_tokens += prompt_tokens

    def get_stats(self) -> EngineStats:
        return self.stats

    def init_utilization_peaks(self) -> None:
        """Set the peaks MBU/MFU are measured against: probed on CPU, datasheet on known GPUs."""
        runner = self.model_runner
        runner.meter.set_peaks(*peaks(runner.device, runner.dtype))

    def utilization(self, recent: bool = False) -> dict[str, Optional[float]]:
        """MBU and MFU (over the last seconds if recent, else since start), with the raw totals."""
        m = self.model_runner.meter
        if m.peak_bandwidth is None:
            self.init_utilization_peaks()
        return dict(mbu=m.mbu(recent), mfu=m.mfu(recent), flops=m.total_flops, bytes=m.total_bytes,
                    busy_seconds=m.total_seconds, peak_flops=m.peak_flops, peak_bandwidth=m.peak_bandwidth)

    def _make_output(self, req: Request) -> Optional[RequestOutput]:
        """The request's output for this step as its output_kind asks; None for FINAL_ONLY
        while running. NOTE: CUMULATIVE copies every token so far, so a long output costs
        O(length) each step; DELTA and FINAL_ONLY keep host work per step O(new tokens)."""
        kind = req.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not req.finished:
            return None
        outs = []
        for seq in req.seqs:
            detok = seq.detokenizer
            visible = detok.visible_len(seq.is_finished) if detok else 0
            if kind is RequestOutputKind.DELTA:
                first_tok, first_char = seq.sent_tokens, seq.sent_chars
                seq.sent_tokens, seq.sent_chars = seq.num_output_tokens, visible
            else:
                first_tok = first_char = 0
            text = detok.text[first_char:visible] if detok else ""
            logprobs = seq.logprobs[first_tok:] if seq.logprobs is not None else None  # a snapshot, not the live list
            outs.append(CompletionOutput(
                index=seq.index, text=text, token_ids=seq.token_ids[seq.num_prompt_tokens + first_tok:],
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, req.prompt_logprobs,
                             outs, req.finished, req.metrics)
