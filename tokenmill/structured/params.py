"""What a constrained request asks for, mirroring vLLM's `StructuredOutputsParams`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Union

# The constraint kinds, in the order vLLM lists them; exactly one is set.
KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """Constrain a request's output with a grammar (set exactly one field).

    Args:
        json: a JSON schema (a dict, or its JSON text); the output is an instance of it.
        regex: the output matches this regular expression.
        choice: the output is exactly one of these strings.
        grammar: an EBNF grammar (GBNF dialect, with a `root` rule) the output belongs to.
        json_object: the output is any JSON object (OpenAI's `response_format: json_object`).
        structural_tag: an xgrammar structural tag (JSON text or dict), as vLLM passes it.
        disable_any_whitespace: accepted for vLLM's users and always in effect: JSON is generated
            in one layout, json.dumps' (`{"a": 1, "b": [2, 3]}`). Free whitespace between tokens
            lets a model pad with newlines until max_tokens runs out: the demo model finished 0
            of 16 objects so, 16 of 16 in the fixed layout (docs/structured-outputs.md).
    """

    json: Optional[Union[str, dict[str, Any]]] = None
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None
    structural_tag: Optional[Union[str, dict[str, Any]]] = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of "
                             f"{', '.join(KINDS)}; got {', '.join(given) or 'none'}")
        for name in ("json", "structural_tag"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from e
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"structured_outputs.{name} must be a JSON object, got {type(value).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be true when set")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """One string per distinct grammar: the compile cache's key. Key order is kept: it is the
        order the grammar writes an object's properties in."""
        return json.dumps([self.kind, getattr(self, self.kind)])
