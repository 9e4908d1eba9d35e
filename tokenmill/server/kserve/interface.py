"""The tensors a tokenmill model takes and gives over the open inference protocol.

Two interfaces, told apart by their inputs:
- FasterTransformer's (what Triton's FasterTransformer backend serves, so existing clients work):
  `input_ids` UINT32 [batch, max_len] (rows padded), `input_lengths` UINT32 [batch, 1],
  `request_output_len` UINT32 [batch, 1], and optional per-row `end_id`, `runtime_top_k` (1, the
  default, is greedy), `runtime_top_p`, `temperature`, `repetition_penalty`, `random_seed` and
  `stop_words_list` INT32 [batch, 2, n] (FasterTransformer's layout: the words' token ids
  concatenated, then their end offsets, padded with -1). Out come `output_ids` UINT32
  [batch, 1, len], each row the prompt followed by the generated tokens (padded with end_id), and
  `sequence_length` UINT32 [batch, 1], plus `output_log_probs` FP32 [batch, 1, new] when asked.
- Text: `text_input` BYTES [batch, 1] and optional `max_tokens`, `temperature`, `top_p`, `top_k`,
  `seed` (each [batch, 1]); out comes `text_output` BYTES [batch, 1] (the prompt and its
  continuation, as Triton's LLM backends answer, unless `exclude_input_in_output` is set).

Each row is its own engine request, batched continuously with everything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.server.kserve.tensors import TensorError

# (name, datatype, shape, required) as model metadata lists them; -1: any size.
FT_INPUTS = [("input_ids", "UINT32", [-1, -1], True), ("input_lengths", "UINT32", [-1, 1], True),
             ("request_output_len", "UINT32", [-1, 1], True), ("end_id", "UINT32", [-1, 1], False),
             ("runtime_top_k", "UINT32", [-1, 1], False), ("runtime_top_p", "FP32", [-1, 1], False),
             ("temperature", "FP32", [-1, 1], False), ("repetition_penalty", "FP32", [-1, 1], False),
             ("random_seed", "UINT64", [-1, 1], False), ("stop_words_list", "INT32", [-1, 2, -1], False)]
TEXT_INPUTS = [("text_input", "BYTES", [-1, 1], True), ("max_tokens", "INT32", [-1, 1], False),
               ("top_k", "INT32", [-1, 1], False), ("top_p", "FP32", [-1, 1], False),
               ("seed", "UINT64", [-1, 1], False)]
OUTPUTS = [("output_ids", "UINT32", [-1, -1, -1]), ("sequence_length", "UINT32", [-1, -1]),
           ("output_log_probs", "FP32", [-1, -1, -1]), ("text_output", "BYTES", [-1, 1])]
_FT_NAMES = {n for n, *_ in FT_INPUTS}
_TEXT_NAMES = {n for n, *_ in TEXT_INPUTS} | {"temperature"}
_INTEGER = "iu"


@dataclass
class Row:
    """One row of a request: an engine request's prompt and parameters."""

    prompt_ids: list[int]
    params: SamplingParams
    text: Optional[str] = None  # the prompt as sent (text interface)
    end_id: Optional[int] = None  # FasterTransformer's end_id: stops generation and pads output_ids


def _per_row(inputs: dict[str, np.ndarray], name: str, batch: int, kinds: str) -> Optional[np.ndarray]:
    """An optional [batch, 1] (or [batch]) input as a flat array of `batch` values."""
    if name not in inputs:
        return None
    a = inputs[name]
    if a.dtype.kind not in kinds:
        raise TensorError(f"input {name!r} has the wrong datatype for its values")
    if a.shape not in ((batch, 1), (batch,), (1, 1), (1,)):
        raise TensorError(f"input {name!r} must have shape [{batch}, 1], got {list(a.shape)}")
    flat = a.reshape(-1)
    return np.repeat(flat, batch) if flat.size == 1 and batch > 1 else flat


def interface_of(inputs: dict[str, np.ndarray]) -> str:
    names = set(inputs)
    if "input_ids" in names:
        unknown = names - _FT_NAMES
        kind = "ft"
    elif "text_input" in names:
        unknown = names - _TEXT_NAMES
        kind = "text"
    else:
        raise TensorError("the request needs 'input_ids' (with 'input_lengths' and 'request_output_len') or "
                          "'text_input'")
    if unknown:
        raise TensorError(f"unknown input(s) {', '.join(sorted(unknown))} for this model")
    return kind


def ft_rows(inputs: dict[str, np.ndarray], tokenizer: Any, logprobs: bool) -> list[Row]:
    for name in ("input_lengths", "request_output_len"):
        if name not in inputs:
            raise TensorError(f"missing required input {name!r}")
    ids = inputs["input_ids"]
    if ids.ndim != 2 or ids.dtype.kind not in _INTEGER:
        raise TensorError(f"input 'input_ids' must be an integer tensor [batch, max_len], got {list(ids.shape)}")
    batch, width = ids.shape
    if batch == 0:
        raise TensorError("input 'input_ids' has no rows")
    lengths = _per_row(inputs, "input_lengths", batch, _INTEGER)
    out_len = _per_row(inputs, "request_output_len", batch, _INTEGER)
    end_id = _per_row(inputs, "end_id", batch, _INTEGER)
    top_k = _per_row(inputs, "runtime_top_k", batch, _INTEGER)
    top_p = _per_row(inputs, "runtime_top_p", batch, "f")
    temperature = _per_row(inputs, "temperature", batch, "f")
    repetition = _per_row(inputs, "repetition_penalty", batch, "f")
    seed = _per_row(inputs, "random_seed", batch, _INTEGER)
    stops = _stop_words(inputs.get("stop_words_list"), batch, tokenizer)
    rows = []
    for b in range(batch):
        n = int(lengths[b])
        if not 1 <= n <= width:
            raise TensorError(f"input_lengths[{b}] is {n}, but input_ids rows hold {width} tokens")
        k = 1 if top_k is None else int(top_k[b])
        p = 0.0 if top_p is None else float(top_p[b])
        # FasterTransformer decodes greedily with its default runtime_top_k of 1, and also when
        # both top_k and top_p are 0.
        greedy = k == 1 or (k == 0 and p == 0.0)
        try:
            params = SamplingParams(
                temperature=0.0 if greedy else (1.0 if temperature is None else float(temperature[b])),
                top_k=0 if greedy else k, top_p=1.0 if p == 0.0 else p,
                repetition_penalty=1.0 if repetition is None else float(repetition[b]),
                seed=None if seed is None else int(seed[b]), max_tokens=int(out_len[b]),
                stop_token_ids=[] if end_id is None else [int(end_id[b])], stop=stops[b] or None,
                logprobs=0 if logprobs else None, output_kind=RequestOutputKind.DELTA)
        except ValueError as e:
            raise TensorError(f"row {b}: {e}") from None
        rows.append(Row([int(t) for t in ids[b, :n]], params, end_id=None if end_id is None else int(end_id[b])))
    return rows


def _stop_words(words: Optional[np.ndarray], batch: int, tokenizer: Any) -> list[list[str]]:
    if words is None:
        return [[] for _ in range(batch)]
    if words.ndim != 3 or words.shape[:2] != (batch, 2) or words.dtype.kind not in _INTEGER:
        raise TensorError(f"input 'stop_words_list' must be INT32 [{batch}, 2, n], got {list(words.shape)}")
    if tokenizer is None:
        raise TensorError("stop_words_list needs the model's tokenizer, and this model has none")
    out = []
    for b in range(batch):
        ids, offsets = words[b, 0], [int(o) for o in words[b, 1] if o >= 0]
        start, row = 0, []
        for end in offsets:
            if not start < end <= len(ids):
                raise TensorError(f"stop_words_list[{b}] has offset {end} outside its {len(ids)} ids")
            word = [int(t) for t in ids[start:end]]
            if any(not 0 <= t < len(tokenizer) for t in word):
                raise TensorError(f"stop_words_list[{b}] holds a token id outside [0, {len(tokenizer)})")
            row.append(tokenizer.decode(word))
            start = end
        out.append([w for w in row if w])
    return out


def text_rows(inputs: dict[str, np.ndarray], tokenizer: Any) -> list[Row]:
    if tokenizer is None:
        raise TensorError("text_input needs the model's tokenizer, and this model has none")
    if inputs["text_input"].dtype != np.object_:
        raise TensorError("input 'text_input' must be BYTES")
    texts = inputs["text_input"].reshape(-1)
    batch = texts.size
    if batch == 0:
        raise TensorError("input 'text_input' has no rows")
    max_tokens = _per_row(inputs, "max_tokens", batch, _INTEGER)
    temperature = _per_row(inputs, "temperature", batch, "f")
    top_p = _per_row(inputs, "top_p", batch, "f")
    top_k = _per_row(inputs, "top_k", batch, _INTEGER)
    seed = _per_row(inputs, "seed", batch, _INTEGER)
    rows = []
    for b, text in enumerate(texts):
        try:
            prompt = text.decode("utf-8") if isinstance(text, bytes) else str(text)
            params = SamplingParams(temperature=1.0 if temperature is None else float(temperature[b]),
                                    top_p=1.0 if top_p is None else float(top_p[b]),
                                    top_k=0 if top_k is None else int(top_k[b]),
                                    seed=None if seed is None else int(seed[b]),
                                    max_tokens=16 if max_tokens is None else int(max_tokens[b]),
                                    output_kind=RequestOutputKind.DELTA)
        except (UnicodeDecodeError, ValueError) as e:
            raise TensorError(f"row {b}: {e}") from None
        rows.append(Row(tokenizer.encode(prompt), params, text=prompt))
    return rows


def ft_outputs(rows: list[Row], finals: list[RequestOutput], end_id: int) -> dict[str, np.ndarray]:
    seqs = [row.prompt_ids + list(f.outputs[0].token_ids) for row, f in zip(rows, finals)]
    width = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), 1, width), dtype=np.uint32)
    for b, (s, row) in enumerate(zip(seqs, rows)):
        ids[b, 0, :] = row.end_id if row.end_id is not None else end_id  # padding: the row's end id
        ids[b, 0, :len(s)] = s
    out = {"output_ids": ids, "sequence_length": np.array([[len(s)] for s in seqs], dtype=np.uint32)}
    if finals and finals[0].outputs[0].logprobs is not None:
        new = max(len(f.outputs[0].token_ids) for f in finals)
        lp = np.zeros((len(finals), 1, new), dtype=np.float32)
        for b, f in enumerate(finals):
            c = f.outputs[0]
            lp[b, 0, :len(c.token_ids)] = [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]
        out["output_log_probs"] = lp
    return out


def text_outputs(rows: list[Row], finals: list[RequestOutput], exclude_input: bool) -> dict[str, np.ndarray]:
    texts = [(f.outputs[0].text if exclude_input else (r.text or "") + f.outputs[0].text).encode("utf-8")
             for r, f in zip(rows, finals)]
    return {"text_output": np.array(texts, dtype=np.object_).reshape(-1, 1)}
