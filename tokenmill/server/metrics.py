"""Every metric the server exports, defined once. Names mirror vLLM's (`vllm:` -> `tokenmill:`) so
dashboards and routers carry over; counters are exposed with the usual `_total` suffix."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.engine.llm_engine import LLMEngine

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"tokenmill:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV blocks held by requests (0-1).")
        self.mbu = gauge("model_bandwidth_utilization",
                         "Bytes moved per busy second over the device's peak bandwidth, last 10 s (0-1).")
        self.mfu = gauge("model_flops_utilization", "FLOPs per busy second over the device's peak, last 10 s (0-1).")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Tokens found in the prefix cache.")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted for lack of KV blocks.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = Counter("tokenmill:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.admission_rejections = Counter("tokenmill:admission_rejections", "Requests refused before the engine.",
                                            ["model_name", "reason"], registry=r)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between generated tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish.", _LATENCY_BUCKETS)
        self.batch_seqs = histogram("batch_size_sequences", "Sequences in each engine step.", _SIZE_BUCKETS)
        self.batch_tokens = histogram("batch_size_tokens", "Tokens computed in each engine step.", _SIZE_BUCKETS)
        self._last: dict[str, int] = {}
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        for reason in ("capacity", "rate_limit", "auth", "signature", "bad_request"):
            self.admission_rejections.labels(model_name, reason)

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
        for name in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions", "prompt_tokens",
                     "generation_tokens"):
            value = getattr(s, name)
            delta = value - self._last.get(name, 0)
            if delta > 0:
                getattr(self, name).inc(delta)
            self._last[name] = value
