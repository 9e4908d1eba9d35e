"""The models one server answers for: each with its own engine and KV pool, its bouncer and its
front ends (OpenAI and KServe), looked up by the name a request gives; or, for a model of a
repository that could not load, the reason it is not ready."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tokenmill.engine.async_engine import AsyncLLMEngine
from tokenmill.server.access import AccessController
from tokenmill.server.admission import Admission, CapacityLimits
from tokenmill.server.chat_tools import ToolSettings
from tokenmill.server.kserve.serving import KServeError, KServeServing
from tokenmill.server.lifecycle import Lifecycle
from tokenmill.server.metrics import ModelMetrics, ServerMetrics
from tokenmill.server.openai import OpenAIServing
from tokenmill.server.protocol import BadRequest


@dataclass
class ServedModel:
    names: list[str]  # the names clients use; the first is the model's own
    version: str = "1"
    engine: Optional[AsyncLLMEngine] = None
    limits: Optional[CapacityLimits] = None
    error: Optional[str] = None  # why it is not ready (no engine)
    tools: ToolSettings = field(default_factory=ToolSettings)


class ServedModels:
    def __init__(self, models: list[ServedModel], access: AccessController, metrics: ServerMetrics,
                 lifecycle: Optional[Lifecycle] = None) -> None:
        if not any(m.engine is not None for m in models):
            raise ValueError("no model could be loaded: " + "; ".join(f"{m.names[0]}: {m.error}" for m in models))
        self.models = models
        self.lifecycle = lifecycle or Lifecycle()
        self._front: dict[str, tuple[OpenAIServing, KServeServing]] = {}
        self._errors: dict[str, str] = {}
        for m in models:
            if m.engine is None:
                self._errors.update({n: m.error or "not loaded" for n in m.names})
                continue
            admission = Admission(m.engine, access, m.limits, metrics.model(m.names[0]), m.names)
            openai = OpenAIServing(admission, m.tools, self.lifecycle)
            self._front.update({n: (openai, KServeServing(openai, m.names, m.version)) for n in m.names})
        # Errors raised before a request names its model are counted under the first model.
        self.default_metrics: ModelMetrics = next(iter(self._front.values()))[0].metrics

    @property
    def ready_names(self) -> list[str]:
        return list(self._front)

    @property
    def engines(self) -> list[AsyncLLMEngine]:
        return [m.engine for m in self.models if m.engine is not None]

    @property
    def serving(self) -> bool:
        """Every loaded model's engine is serving (a model that failed to load does not count)."""
        return all(e.is_serving for e in self.engines)

    @property
    def ready(self) -> bool:
        """Serving and not shutting down: what health and readiness checks answer."""
        return self.serving and not self.lifecycle.draining

    def openai(self, name: str) -> OpenAIServing:
        if name in self._errors:
            raise BadRequest(f"the model {name!r} is not ready: {self._errors[name]}", param="model",
                             code="model_not_ready", status=503)
        if name not in self._front:
            raise BadRequest(f"the model {name!r} does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self._front)}", param="model", code="model_not_found",
                             status=404)
        return self._front[name][0]

    def kserve(self, name: str, version: Optional[str] = None) -> KServeServing:
        if name in self._errors:
            raise KServeError(503, f"model {name!r} is not ready: {self._errors[name]}")
        if name not in self._front:
            raise KServeError(404, f"unknown model {name!r}; this server serves {', '.join(self._front)}")
        kserve = self._front[name][1]
        kserve.check_model(name, version)
        return kserve

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model with its state and, when not ready, the reason."""
        out = []
        for m in self.models:
            ready = m.engine is not None and m.engine.is_serving and not self.lifecycle.draining
            entry = {"name": m.names[0], "version": m.version, "state": "READY" if ready else "UNAVAILABLE"}
            if m.engine is None:
                entry["reason"] = m.error or "not loaded"
            out.append(entry)
        return out
