"""Every metric the server exports, defined once. Names mirror vLLM's (`vllm:` -> `tokenmill:`) so
dashboards and routers carry over; counters are exposed with the usual `_total` suffix."""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    """The registry and its metric families, shared by every model the server serves; each
    model's samples carry its `model_name` label (`model()` gives a model's view)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.families: dict[str, Any] = {}

        def add(kind: Any, name: str, doc: str, extra: tuple[str, ...] = (), **kw: Any) -> None:
            self.families[name] = kind(f"tokenmill:{name}", doc, labels + list(extra), registry=r, **kw)

        add(Gauge, "num_requests_running", "Requests in the running batch.")
        add(Gauge, "num_requests_waiting", "Requests waiting to be scheduled.")
        add(Gauge, "kv_cache_usage_perc", "Fraction of KV blocks held by requests (0-1).")
        add(Gauge, "kv_cache_blocks_cached", "KV blocks holding cached prefixes that no request uses.")
        add(Gauge, "model_bandwidth_utilization",
            "Bytes moved per busy second over the device's peak bandwidth, last 10 s (0-1).")
        add(Gauge, "model_flops_utilization", "FLOPs per busy second over the device's peak, last 10 s (0-1).")
        add(Counter, "prefix_cache_queries", "Tokens looked up in the prefix cache.")
        add(Counter, "prefix_cache_hits", "Tokens found in the prefix cache.")
        add(Counter, "num_preemptions", "Sequences preempted for lack of KV blocks.")
        add(Counter, "prompt_tokens", "Prompt tokens computed.")
        add(Counter, "generation_tokens", "Tokens generated.")
        add(Counter, "spec_decode_num_drafts", "Speculative proposals verified (one per sequence per step).")
        add(Counter, "spec_decode_num_draft_tokens", "Proposed tokens verified.")
        add(Counter, "spec_decode_num_accepted_tokens", "Proposed tokens accepted.")
        add(Counter, "spec_decode_num_accepted_tokens_per_pos", "Proposed tokens accepted, by position in the "
            "proposal (0 = the first).", ("position",))
        add(Gauge, "spec_decode_auto_speculating", 'With method "auto": 1 if the last decision was to propose.')
        add(Gauge, "spec_decode_expected_accepted_length",
            'With method "auto": tokens a verification is expected to emit, from the measured acceptance.')
        add(Counter, "request_success", "Finished requests by finish reason.", ("finished_reason",))
        add(Counter, "admission_rejections", "Requests refused before the engine.", ("reason",))
        add(Gauge, "num_requests_admitted", "Requests admitted and not yet ended, by API key id (fair shares).",
            ("key_id",))
        add(Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY_BUCKETS)
        add(Histogram, "inter_token_latency_seconds", "Time between generated tokens.", buckets=_LATENCY_BUCKETS)
        add(Histogram, "e2e_request_latency_seconds", "Request latency, arrival to finish.", buckets=_LATENCY_BUCKETS)
        add(Histogram, "batch_size_sequences", "Sequences in each engine step.", buckets=_SIZE_BUCKETS)
        add(Histogram, "batch_size_tokens", "Tokens computed in each engine step.", buckets=_SIZE_BUCKETS)

    def model(self, model_name: str) -> "ModelMetrics":
        return ModelMetrics(self, model_name)


class ModelMetrics:
    """One model's samples of the server's metrics."""

    def __init__(self, server: ServerMetrics, model_name: str) -> None:
        f, self.model_name = server.families, model_name
        self.registry = server.registry
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_blocks_cached",
                     "prefix_cache_queries",
                     "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens"):
            setattr(self, name, f[name].labels(model_name))
        self.mbu = f["model_bandwidth_utilization"].labels(model_name)
        self.mfu = f["model_flops_utilization"].labels(model_name)
        self.ttft = f["time_to_first_token_seconds"].labels(model_name)
        self.itl = f["inter_token_latency_seconds"].labels(model_name)
        self.e2e = f["e2e_request_latency_seconds"].labels(model_name)
        self.batch_seqs = f["batch_size_sequences"].labels(model_name)
        self.batch_tokens = f["batch_size_tokens"].labels(model_name)
        for name in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"):
            setattr(self, name, f[name].labels(model_name))
        self.spec_per_pos = f["spec_decode_num_accepted_tokens_per_pos"]
        self.spec_auto = f["spec_decode_auto_speculating"].labels(model_name)
        self.spec_expected = f["spec_decode_expected_accepted_length"].labels(model_name)
        self.request_success = f["request_success"]
        self.admission_rejections = f["admission_rejections"]
        self.num_requests_admitted = f["num_requests_admitted"]
        self._last: dict[str, int] = {}
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(model_name, reason)
        for reason in ("capacity", "rate_limit", "auth", "signature", "bad_request"):
            self.admission_rejections.labels(model_name, reason)

    def admitted_by_key(self, key_id: str, count: int) -> None:
        self.num_requests_admitted.labels(self.model_name, key_id).set(count)

    def reject(self, reason: str) -> None:
        self.admission_rejections.labels(self.model_name, reason).inc()

    def finished(self, reason: str) -> None:
        self.request_success.labels(self.model_name, reason).inc()

    def update_gauges(self, engine: LLMEngine) -> None:
        """Current load, read on the engine thread (also when idle, e.g. right after an abort)."""
        sched = engine.scheduler
        self.num_requests_running.set(len({q.request.request_id for q in sched.running}))
        self.num_requests_waiting.set(len({q.request.request_id for q in sched.waiting}))
        self.kv_cache_usage_perc.set(engine.block_manager.usage)
        self.kv_cache_blocks_cached.set(engine.block_manager.num_cached_blocks)

    def on_step(self, engine: LLMEngine, stepped: bool) -> None:
        """Called by the engine thread after each loop turn: gauges, batch sizes, counter deltas."""
        self.update_gauges(engine)
        if not stepped:
            return
        util = engine.utilization(recent=True)
        self.mbu.set(util["mbu"] or 0.0)
        self.mfu.set(util["mfu"] or 0.0)
        s = engine.get_stats()
        if s.batch_num_seqs:
            self.batch_seqs.observe(s.batch_num_seqs)
            self.batch_tokens.observe(s.batch_num_tokens)
        counters = {name: (getattr(s, name), getattr(self, name)) for name in (
            "prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens")}
        spec = s.spec_decode
        if spec is not None:
            counters.update(spec_decode_num_drafts=(spec.num_drafts, self.spec_decode_num_drafts),
                            spec_decode_num_draft_tokens=(spec.num_draft_tokens, self.spec_decode_num_draft_tokens),
                            spec_decode_num_accepted_tokens=(spec.num_accepted_tokens,
                                                             self.spec_decode_num_accepted_tokens))
            if spec.decision:
                self.spec_auto.set(1.0 if spec.decision["speculate"] else 0.0)
                if "expected_accepted_length" in spec.decision:
                    self.spec_expected.set(spec.decision["expected_accepted_length"])
            for pos, value in enumerate(spec.accepted_per_position):
                counters[f"spec_pos{pos}"] = (value, self.spec_per_pos.labels(self.model_name, str(pos)))
        for name, (value, counter) in counters.items():
            delta = value - self._last.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._last[name] = value
