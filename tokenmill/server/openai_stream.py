"""The server-sent events of a streamed completion or chat completion: OpenAI's chunks, with
each choice's text (or tool-call fragments) as it comes, its logprobs, and usage at the end."""
from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Optional

from tokenmill.server.chat_tools import ReplyStream, ToolPlan
from tokenmill.server.errors import error_body
from tokenmill.server.openai_format import failure_message, logprobs_json

if TYPE_CHECKING:  # openai.py imports this module
    from tokenmill.server.openai import Job, OpenAIServing


async def stream_chunks(serving: OpenAIServing, jobs: list[Job], rid: str, created: int, model: str, chat: bool,
                    include_usage: bool, plan: ToolPlan) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: Optional[dict] = None) -> str:
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"

    prompt_tokens = completion_tokens = 0
    sent_text: list[dict[int, int]] = [{} for _ in jobs]
    sent_tokens: list[dict[int, int]] = [{} for _ in jobs]
    done: list[set[int]] = [set() for _ in jobs]
    replies = [{i: ReplyStream(plan) for i in range(job.params.n)} for job in jobs]
    if chat:
        yield chunk([{"index": job.first_choice + i, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for job in jobs for i in range(job.params.n)])
    # NOTE: if the client goes away, Starlette stops this generator; closing the merged
    # iterator aborts every engine request of this call and their KV blocks return at once.
    async with contextlib.aclosing(serving.run_all(jobs)) as outputs:
        async for j, out in outputs:
            job = jobs[j]
            choices = []
            for c in out.outputs:
                old_text, old_tok = sent_text[j].get(c.index, 0), sent_tokens[j].get(c.index, 0)
                delta = c.text[old_text:]
                if c.index in done[j] or (not delta and c.finish_reason is None):
                    continue
                if c.finish_reason is not None:
                    done[j].add(c.index)
                first = c.index not in sent_tokens[j]
                sent_text[j][c.index] = len(c.text)  # handed on: to the client, or to the tool-call parser
                index = job.first_choice + c.index
                if chat:
                    reply = replies[j][c.index]
                    body = reply.delta(delta, c.finish_reason is not None)
                    if not body and c.finish_reason is None:
                        continue  # held back (it may start a tool call); its logprobs go with the next chunk
                    entry = {"index": index, "delta": body, "finish_reason": reply.finish_reason(c.finish_reason)}
                else:
                    entry = {"index": index, "text": (job.echo or "") + delta if first else delta,
                             "finish_reason": c.finish_reason}
                sent_tokens[j][c.index] = len(c.token_ids)
                entry["logprobs"] = (logprobs_json(c, old_tok, chat, job.params.logprobs,
                                                   serving.echo_prompt(job, out) if first else None)
                                     if job.params.logprobs is not None else None)
                choices.append(entry)
            failed = failure_message([out])
            if failed:  # OpenAI's streamed error: an error object in place of a chunk, then the end
                yield f"data: {json.dumps(error_body(failed, 500, code='engine_error'))}\n\n"
                break
            if choices:
                yield chunk(choices)
            if out.finished:
                prompt_tokens += len(out.prompt_token_ids)
                completion_tokens += sum(len(c.token_ids) for c in out.outputs)
    if include_usage:
        yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens})
    yield "data: [DONE]\n\n"
