"""The live load of each model as JSON (`GET /stats`, which the dashboard polls every second),
read from the Prometheus registry itself, so its numbers are exactly those of /metrics."""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry

_PREFIX = "tokenmill:"
# Labelled counters whose children are reported by that label (reason -> count).
_BY_LABEL = {"request_success": "finished_reason", "admission_rejections": "reason"}
# Labelled gauges reported the same way (label -> value).
_GAUGES_BY_LABEL = {"num_requests_admitted": "key_id"}


def live_stats(registry: CollectorRegistry) -> dict[str, Any]:
    """{"time", "models": {name: {gauge: value, counter_total: value, labelled_total: {label: value},
    histogram: {"buckets": [[le, cumulative count], ...], "sum", "count"}}}}."""
    models: dict[str, dict[str, Any]] = {}
    for family in registry.collect():
        name = family.name.removeprefix(_PREFIX)
        for s in family.samples:
            model = s.labels.get("model_name")
            if model is None or s.name.endswith("_created"):
                continue
            out = models.setdefault(model, {})
            if family.type == "histogram":
                h = out.setdefault(name, {"buckets": [], "sum": 0.0, "count": 0})
                if s.name.endswith("_bucket"):
                    le = s.labels["le"]
                    h["buckets"].append([le if le == "+Inf" else float(le), s.value])
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
                elif s.name.endswith("_count"):
                    h["count"] = s.value
            elif family.type == "counter":
                key = f"{name}_total"
                if name in _BY_LABEL:
                    out.setdefault(key, {})[s.labels[_BY_LABEL[name]]] = s.value
                else:
                    out[key] = s.value
            elif name in _GAUGES_BY_LABEL:
                out.setdefault(name, {})[s.labels[_GAUGES_BY_LABEL[name]]] = s.value
            else:
                out[name] = s.value
    return {"time": time.time(), "models": models}
