"""The OpenAI response pieces built from engine outputs: running totals, logprobs, choices."""
from __future__ import annotations

from typing import Any, Optional

from tokenmill.outputs import CompletionOutput, Logprob, RequestOutput


def accumulate(acc: dict[int, CompletionOutput], delta: RequestOutput) -> RequestOutput:
    """Fold a DELTA output into the job's running totals (mutated in place) and return them."""
    for c in delta.outputs:
        a = acc.get(c.index)
        if a is None:
            a = acc[c.index] = CompletionOutput(c.index, "", [], None, [] if c.logprobs is not None else None)
        a.text += c.text
        a.token_ids.extend(c.token_ids)
        if c.logprobs is not None and a.logprobs is not None:
            a.logprobs.extend(c.logprobs)
        a.cumulative_logprob, a.finish_reason, a.stop_reason = c.cumulative_logprob, c.finish_reason, c.stop_reason
    return RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, delta.prompt_logprobs,
                         [acc[i] for i in sorted(acc)], delta.finished, delta.metrics)


_Entry = Optional[tuple[str, float, list[tuple[str, float]]]]


def _entries(token_ids: list[int], logprobs: list[Optional[dict[int, Logprob]]], k: int) -> list[_Entry]:
    out: list[_Entry] = []
    for tid, d in zip(token_ids, logprobs):
        if d is None:  # a prompt's first token: nothing to condition on
            out.append(None)
            continue
        chosen = d[tid]
        top = sorted(d.items(), key=lambda kv: kv[1].rank)[:k]
        out.append((chosen.decoded_token or "", chosen.logprob, [(lp.decoded_token or "", lp.logprob) for _, lp in top]))
    return out


def logprobs_json(c: CompletionOutput, start: int, chat: bool, k: int,
                  echo: Optional[tuple[RequestOutput, str]] = None) -> Optional[dict[str, Any]]:
    """The choice's logprobs from its token `start` on. With `echo` (completions: the output
    carrying prompt_logprobs, and the text of the prompt's first token), the prompt's tokens come
    first, the first of them without a logprob, as in OpenAI's API."""
    if c.logprobs is None:
        return None
    entries = _entries(c.token_ids[start:], c.logprobs[start:], k)
    first_text = ""
    if echo is not None and echo[0].prompt_logprobs is not None:
        entries = _entries(echo[0].prompt_token_ids, echo[0].prompt_logprobs, k) + entries
        first_text = echo[1]
    if chat:
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                             "top_logprobs": [{"token": tt, "logprob": tl, "bytes": list(tt.encode())}
                                              for tt, tl in top]} for t, lp, top in entries]}
    return {"tokens": [e[0] if e else first_text for e in entries],
            "token_logprobs": [e[1] if e else None for e in entries],
            "top_logprobs": [{tt: tl for tt, tl in e[2]} if e else None for e in entries], "text_offset": []}


def failure_message(outputs: list[RequestOutput]) -> Optional[str]:
    """What went wrong, if the engine failed one of these outputs' choices (finish_reason "error")."""
    for out in outputs:
        for c in out.outputs:
            if c.finish_reason == "error":
                return str(c.stop_reason or "the engine failed the request")
    return None
