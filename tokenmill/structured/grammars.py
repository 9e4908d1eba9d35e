"""From a request's constraint to a compiled grammar: checked at once, compiled off the engine
thread, cached per distinct grammar.

Checking (building the xgrammar `Grammar`) is cheap and happens when the request arrives, so a
schema the engine cannot enforce is refused there, naming the part at fault. Compiling (the
per-token mask tables over the whole vocabulary) can take long for a big schema and vocabulary:
it runs on a worker thread while the engine keeps stepping everyone else's requests.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import xgrammar as xgr

from tokenmill.structured.matcher import matches_nothing
from tokenmill.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Distinct grammars kept compiled; the oldest unused one goes first.
CACHE_SIZE = 256
# Deepest schema nesting accepted: building a grammar 64 levels deep takes ~30 ms, 400 levels 3 s.
MAX_SCHEMA_DEPTH = 64

# JSON-schema keywords xgrammar 0.2.9 accepts but does not enforce: an output could break them,
# so a schema using them is refused rather than half-honoured. Found by compiling schemas with and
# without each keyword and feeding the matcher an instance that breaks it.
_UNENFORCED = ("allOf", "not", "if", "then", "else", "contains", "minContains", "maxContains",
               "dependentRequired", "dependentSchemas", "dependencies", "$dynamicRef", "$recursiveRef")
_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
            "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}
# Keywords whose values are subschemas: a dict of them, a list of them, or one.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: ".
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarMatchesNothing(ValueError):
    """A grammar whose first mask leaves no token (say the regex `[^\\s\\S]`)."""


def unsupported_schema_part(schema: Any, path: str = "#", depth: int = 0) -> str | None:
    """The first part of a JSON schema the grammar engine would not enforce, as "where: what"."""
    if not isinstance(schema, dict):
        return None
    if depth > MAX_SCHEMA_DEPTH:  # building the grammar grows steeply with nesting
        return f"{path}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"
    for kw in _UNENFORCED:
        if kw in schema:
            return f"{path}: {kw!r} is not supported"
    if schema.get("uniqueItems") is True:
        return f"{path}: 'uniqueItems' is not supported"
    if schema.get("unevaluatedItems") not in (None, False):
        return f"{path}: 'unevaluatedItems' is not supported"
    if "oneOf" in schema and "discriminator" not in schema:
        # Enforced as anyOf: an output matching two branches would break oneOf. A discriminated
        # union (Pydantic writes one) has branches that exclude each other.
        return f"{path}: 'oneOf' is only supported with a discriminator (use anyOf)"
    if isinstance(schema.get("required"), list):
        # xgrammar allows no property beyond `properties`, so a required one missing there
        # could never be written.
        missing = [r for r in schema["required"] if r not in (schema.get("properties") or {})]
        if missing:
            return f"{path}: required property {missing[0]!r} is not in 'properties'"
    if "multipleOf" in schema and schema.get("type") != "integer":
        return f"{path}: 'multipleOf' is only supported with type integer"
    for kw in ("pattern", "format"):
        if kw in schema and ("minLength" in schema or "maxLength" in schema):
            return f"{path}: minLength/maxLength together with {kw!r} is not supported (put the length in the pattern)"
    fmt = schema.get("format")
    if fmt is not None and fmt not in _FORMATS:
        return f"{path}: format {fmt!r} is not supported (supported: {', '.join(sorted(_FORMATS))})"
    for kw in _SCHEMA_MAPS:
        if isinstance(schema.get(kw), dict):
            for name, sub in schema[kw].items():
                found = unsupported_schema_part(sub, f"{path}/{kw}/{name}", depth + 1)
                if found:
                    return found
    for kw in _SCHEMA_LISTS:
        if isinstance(schema.get(kw), list):
            for i, sub in enumerate(schema[kw]):
                found = unsupported_schema_part(sub, f"{path}/{kw}/{i}", depth + 1)
                if found:
                    return found
    for kw in _SCHEMA_ONES:
        found = unsupported_schema_part(schema.get(kw), f"{path}/{kw}", depth + 1)
        if found:
            return found
    return None


def _tag_schemas(node: Any):
    """The JSON schemas inside a structural tag (its json_schema formats, at any depth)."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema":
            yield node.get("json_schema")
        for value in node.values():
            yield from _tag_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tag_schemas(value)


def _cpp_message(e: Exception) -> str:
    return _CPP_PREFIX.sub("", str(e).strip().splitlines()[0] if str(e).strip() else repr(e))


def build_grammar(params: StructuredOutputsParams) -> xgr.Grammar:
    """The grammar of a constraint; ValueError naming what the engine cannot enforce."""
    kind = params.kind
    ws = dict(any_whitespace=False)  # one layout, json.dumps' (see StructuredOutputsParams)
    try:
        if kind == "json":
            bad = unsupported_schema_part(params.json)
            if bad:
                raise ValueError(f"structured_outputs.json: the JSON schema at {bad}")
            return xgr.Grammar.from_json_schema(json.dumps(params.json), **ws)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(json.dumps({"type": "object"}), **ws)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            # JSON's string escapes are also those of the grammar's string literals.
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                 for c in params.choice))
        if kind == "grammar":
            return xgr.Grammar.from_ebnf(params.grammar)
        for schema in _tag_schemas(params.structural_tag):
            bad = unsupported_schema_part(schema)
            if bad:
                raise ValueError(f"structured_outputs.structural_tag: a JSON schema at {bad}")
        return xgr.Grammar.from_structural_tag(json.dumps(params.structural_tag))
    except (RuntimeError, xgr.InvalidJSONError, xgr.InvalidStructuralTagError) as e:
        raise ValueError(f"structured_outputs.{kind}: {_cpp_message(e)}") from e
    except Exception as e:  # noqa: BLE001 - pydantic validation of a structural tag, and the like
        if isinstance(e, ValueError) and str(e).startswith("structured_outputs."):
            raise
        raise ValueError(f"structured_outputs.{kind}: {_cpp_message(e)}") from e


class GrammarCache:
    """Compiled grammars for one tokenizer, keyed by constraint; compiles on a worker thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        # The model's vocabulary (the logits' width) may be padded past the tokenizer's.
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=stop_token_ids or None)
        self.stop_token_ids = stop_token_ids
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-grammar")
        self._cache: OrderedDict[str, Future] = OrderedDict()
        # Grammars built by check() and not yet compiled, so that compiling does not build again.
        self._built: OrderedDict[str, xgr.Grammar] = OrderedDict()
        self._lock = threading.Lock()  # the server's threads and the engine's both submit
        self.hits = self.misses = 0

    def check(self, params: StructuredOutputsParams) -> None:
        """Raise ValueError if this constraint cannot be enforced (no compilation, but building
        the grammar of a big schema takes a while: the server calls this off its event loop)."""
        key = params.key()
        with self._lock:
            if key in self._cache or key in self._built:
                return
        grammar = build_grammar(params)
        with self._lock:
            self._built[key] = grammar
            while len(self._built) > CACHE_SIZE:
                self._built.popitem(last=False)

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar; resolved at once if an earlier request compiled it."""
        key = params.key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                self.hits += 1
                return fut
            self.misses += 1
            fut = self._pool.submit(self._compile, params, self._built.pop(key, None))
            self._cache[key] = fut
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, params: StructuredOutputsParams, grammar: Optional[xgr.Grammar] = None) -> xgr.CompiledGrammar:
        compiled = self.compiler.compile_grammar(grammar if grammar is not None else build_grammar(params))
        if matches_nothing(compiled):  # checked once here, not on every request that reuses it
            raise GrammarMatchesNothing("the grammar matches no output at all")
        logger.debug("compiled a %s grammar", params.kind)
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
