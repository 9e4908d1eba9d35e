"""The GPTQ quantization config, as GPTQModel / AutoGPTQ write it to `quantization_config`."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input channels
    desc_act: bool = False  # act-order: quantize columns by descending Hessian diagonal
    sym: bool = True
    damp_percent: float = 0.01
    static_groups: bool = False
    true_sequential: bool = True
    lm_head: bool = False
    # GPTQModel's per-module rules: regex (matched from the start of the module name) -> overrides;
    # a "-:" prefix leaves matching modules unquantized, "+:" (or no prefix) overrides fields.
    dynamic: Optional[dict[str, dict[str, Any]]] = None
    quant_method: str = "gptq"
    checkpoint_format: str = "gptq"
    _rules: list[tuple[bool, re.Pattern, dict[str, Any]]] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        self._validate(self.bits, self.group_size, self.damp_percent, where="")
        if self.quant_method != "gptq":
            raise ValueError(f"quant_method {self.quant_method!r} is not supported (only 'gptq')")
        if self.checkpoint_format != "gptq":
            raise ValueError(f"checkpoint_format {self.checkpoint_format!r} is not supported (only 'gptq', v1)")
        self._rules = []
        for key, overrides in (self.dynamic or {}).items():
            negative = key.startswith("-:")
            pattern = key[2:] if key[:2] in ("-:", "+:") else key
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise ValueError(f"dynamic rule {key!r} is not a valid regex: {e}") from None
            overrides = dict(overrides or {})
            unknown = set(overrides) - {"bits", "group_size", "sym", "desc_act", "damp_percent", "static_groups"}
            if unknown:
                raise ValueError(f"dynamic rule {key!r} sets unknown field(s): {', '.join(sorted(unknown))}")
            if not negative:
                self._validate(overrides.get("bits", self.bits), overrides.get("group_size", self.group_size),
                               overrides.get("damp_percent", self.damp_percent), where=f" in dynamic rule {key!r}")
            self._rules.append((negative, compiled, overrides))

    @staticmethod
    def _validate(bits: int, group_size: int, damp: float, where: str) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}{where}, got {bits!r}")
        if group_size != -1 and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be -1 or a positive integer{where}, got {group_size!r}")
        if not 0 <= damp < 1:
            raise ValueError(f"damp_percent must be in [0, 1){where}, got {damp!r}")

    def for_module(self, name: str) -> Optional[dict[str, Any]]:
        """The settings for one module, or None when a rule leaves it unquantized. First match wins."""
        base = dict(bits=self.bits, group_size=self.group_size, sym=self.sym, desc_act=self.desc_act,
                    damp_percent=self.damp_percent, static_groups=self.static_groups)
        for negative, pattern, overrides in self._rules:
            if pattern.match(name):
                if negative:
                    return None
                base.update(overrides)
                return base
        return base

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_rules")
        return d

    @classmethod
    def from_dict(cls, d: Union[dict[str, Any], Any]) -> "QuantizeConfig":
        if not isinstance(d, dict):
            d = d.to_dict() if hasattr(d, "to_dict") else dict(d)
        known = {k: d[k] for k in ("bits", "group_size", "desc_act", "sym", "damp_percent", "static_groups",
                                   "true_sequential", "lm_head", "dynamic", "quant_method", "checkpoint_format")
                 if k in d and d[k] is not None}
        return cls(**known)
