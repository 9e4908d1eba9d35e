"""/v1/completions and /v1/chat/completions: translate, admit, hand to the engine, format back."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, StreamingResponse

from tokenmill.engine.request_validation import InvalidRequest
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import access_log
from tokenmill.server.admission import Admission
from tokenmill.server.chat_tools import ToolPlan, ToolSettings, plan_tools, reply_message
from tokenmill.server.errors import error_body
from tokenmill.server.lifecycle import ABORTED, Lifecycle
from tokenmill.server.openai_format import accumulate, failure_message, logprobs_json
from tokenmill.server.openai_stream import stream_chunks
from tokenmill.server.refusal import Refusal
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.tokenizer import chat_template_ids
from tokenmill.server.protocol import BadRequest, ChatCompletionRequest, CompletionRequest, _SamplingFields


@dataclass
class Job:
    """One engine request behind an HTTP request (a completions call may carry several prompts)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    first_choice: int  # index of this job's first choice in the response
    echo: Optional[str] = None  # completions' echo: the prompt's text, put before the output
    priority: int = 0  # with --scheduling-policy priority: lower runs first


class OpenAIServing:
    def __init__(self, admission: Admission, tools: Optional[ToolSettings] = None,
                 lifecycle: Optional[Lifecycle] = None) -> None:
        self.admission = admission
        self.lifecycle = lifecycle or Lifecycle()
        self.engine = admission.engine
        self.tokenizer = admission.tokenizer
        self.metrics = admission.metrics
        self.tools = tools or ToolSettings()

    def begin(self, model: str) -> None:
        """A generation request arrives: refused while shutting down."""
        access_log.note_model(model)
        try:
            self.lifecycle.check_open()
        except Refusal as r:
            self.metrics.reject(r.reason)
            raise

    # -- request translation --------------------------------------------------------------
    def _prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            return [self.tokenizer.encode(p)]
        if not p:
            raise BadRequest("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return [self.tokenizer.encode(x) for x in p]
        if all(isinstance(x, list) for x in p):
            return [list(x) for x in p]
        raise BadRequest("prompt must be a string, a list of strings, or token ids", param="prompt")

    def _jobs(self, prompts: list[list[int]], make_params, headers: Any, max_tokens: Optional[int],
              max_tokens_param: str, priority: int = 0) -> list[Job]:
        jobs, choice = [], 0
        validator = self.admission.validator
        if priority != 0 and self.engine.engine.scheduler_config.scheduling_policy != "priority":
            raise BadRequest(f"priority {priority} needs the server started with --scheduling-policy priority",
                             param="priority")
        for ids in prompts:
            # No max_tokens: the rest of the context (a prompt that leaves none fails the check).
            params = make_params(max_tokens if max_tokens is not None else max(1, validator.room(ids)))
            prompt_param = "messages" if max_tokens_param == "max_completion_tokens" else "prompt"
            validator.check(ids, params, max_tokens_must_fit=True, prompt_param=prompt_param,
                            max_tokens_param=max_tokens_param)
            jobs.append(Job(f"cmpl-{uuid.uuid4().hex}", ids, params, choice, priority=priority))
            choice += params.n
        return jobs

    async def _structured(self, body: _SamplingFields, tools: Optional[StructuredOutputsParams] = None
                          ) -> Optional[StructuredOutputsParams]:
        """The request's output constraint, checked and compiled before the request is admitted,
        off both the event loop and the engine thread (a 400 names the field and what is wrong)."""
        asked = body.structured()
        if asked is not None and tools is not None:
            raise BadRequest(f"{asked[1]} cannot be combined with tool_choice {body.tool_choice!r}: both constrain "
                             "the whole reply", param=asked[1])
        so, source = asked if asked is not None else (tools, "tools")
        if so is None:
            return None
        engine = self.engine.engine
        try:
            await asyncio.to_thread(engine.check_structured_outputs, so)
        except InvalidRequest as e:
            problem: Optional[str] = e.message
        else:
            compiled = engine.grammars.submit(so)
            await asyncio.wait([asyncio.wrap_future(compiled)])  # done, failed or not
            problem = engine.grammar_problem(compiled)
        if problem:
            if source == "tools":  # the tools' schemas are what the structural tag holds
                problem = problem.replace("structured_outputs.structural_tag", "tools").replace(
                    "structured_outputs", "tools")
            raise BadRequest(problem.replace("structured_outputs", source, 1), param=source)
        return so

    async def completions(self, body: CompletionRequest, request: Request) -> Union[JSONResponse, StreamingResponse]:
        self.begin(body.model)
        self.admission.check_model(body.model)
        body.check_fields()
        self.admission.precheck(request.headers, body.priority)  # a full server refuses before tokenizing
        so = await self._structured(body)
        # echo with logprobs: the prompt's logprobs come first, as in OpenAI's API.
        prompt_lp = body.logprobs if body.echo and body.logprobs is not None else None
        prompts = self._prompts(body)
        jobs = self._jobs(prompts, lambda mt: body.sampling_params(mt, body.logprobs, so, prompt_lp),
                          request.headers, body.max_tokens, "max_tokens", body.priority)
        if body.echo:
            texts = [body.prompt] if isinstance(body.prompt, str) else None
            if texts is None and all(isinstance(x, str) for x in body.prompt):
                texts = list(body.prompt)
            for i, job in enumerate(jobs):
                job.echo = texts[i] if texts else self.tokenizer.decode(job.prompt_ids)
        self.admission.admit(request.headers, jobs)
        return await self._respond(body, jobs, request, chat=False)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Union[JSONResponse, StreamingResponse]:
        self.begin(body.model)
        self.admission.check_model(body.model)
        body.check_fields()
        self.admission.precheck(request.headers, body.priority)  # a full server refuses before tokenizing
        conversation = body.conversation()
        plan = plan_tools(body, self.tools)
        so = await self._structured(body, plan.structured)
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template", param="messages")
        try:
            ids = chat_template_ids(self.tokenizer, conversation, tools=plan.template_tools)
        except TemplateError as e:  # e.g. a template that insists roles alternate
            raise BadRequest(f"the chat template refused these messages: {e}", param="messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        jobs = self._jobs([ids], lambda mt: body.sampling_params(mt, logprobs, so), request.headers, max_tokens, param,
                          body.priority)
        self.admission.admit(request.headers, jobs)
        return await self._respond(body, jobs, request, chat=True, plan=plan)

    # -- running and formatting -----------------------------------------------------------
    async def _run(self, job: Job, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one job, cumulative (the engine sends deltas, accumulated here
        in O(new tokens) per step), with latency metrics and the access log's tokens recorded on
        the way. Once a shutdown's timeout passes, the job ends at once with finish_reason "abort"."""
        start = last = time.monotonic()
        tokens, finished = 0, False
        acc: dict[int, CompletionOutput] = {}
        out: Optional[RequestOutput] = None
        record = access_log.current()
        life = self.lifecycle
        life.jobs += 1
        try:
            while True:
                try:
                    delta = await life.next_or_abort(outputs)
                except StopAsyncIteration:
                    break
                aborted = delta is ABORTED
                if out is None and not aborted:
                    self.admission.shares.mark_seen(job.request_id)
                out = self._aborted(job, acc, out) if aborted else accumulate(acc, delta)
                now = time.monotonic()
                n = sum(len(c.token_ids) for c in out.outputs)
                if n > tokens:
                    if tokens == 0:
                        self.metrics.ttft.observe(now - start)
                        if record is not None:
                            record.token_seen(now)
                    else:
                        self.metrics.itl.observe((now - last) / (n - tokens))
                    tokens, last = n, now
                if out.finished:
                    finished = True
                    self.metrics.e2e.observe(now - start)
                    for c in out.outputs:
                        self.metrics.finished(c.finish_reason or "abort")
                yield out
                if aborted:
                    break
        finally:
            self.admission.release(job.request_id)  # however it ended, its fair share is free again
            life.jobs -= 1
            await outputs.aclose()  # aborts the engine request if it did not finish
            if not finished:  # the client went away (or the engine failed): counted as aborted
                for _ in range(job.params.n):
                    self.metrics.finished("abort")
            if record is not None:
                reasons = [c.finish_reason or "abort" for c in out.outputs] if finished and out else ["abort"]
                record.job_done(len(job.prompt_ids), tokens, reasons)

    @staticmethod
    def _aborted(job: Job, acc: dict[int, CompletionOutput], last: Optional[RequestOutput]) -> RequestOutput:
        """The job's final output when the server aborts it: what it made so far, every choice
        that had not finished ending with finish_reason "abort"."""
        for i in range(job.params.n):
            if i not in acc:
                acc[i] = CompletionOutput(i, "", [], None, [] if job.params.logprobs is not None else None)
            if acc[i].finish_reason is None:
                acc[i].finish_reason = "abort"
        if last is None:
            return RequestOutput(job.request_id, None, job.prompt_ids, None, [acc[i] for i in sorted(acc)], True)
        return RequestOutput(last.request_id, last.prompt, last.prompt_token_ids, last.prompt_logprobs,
                             [acc[i] for i in sorted(acc)], True, last.metrics)

    async def run_all(self, jobs: list[Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every job's outputs as they come, tagged with the job's index. The jobs are submitted
        together, so a list of prompts is batched in the same engine steps, not run in turn."""
        record = access_log.current()
        if record is not None and record.log_prompts:  # --log-prompts: the text the model reads
            texts = [self.tokenizer.decode(j.prompt_ids) for j in jobs]
            record.prompt = texts[0] if len(texts) == 1 else texts
        streams = self.engine.generate_batch([(j.request_id, j.prompt_ids, j.params, j.priority) for j in jobs])
        if len(jobs) == 1:
            # aclosing: a caller that stops early closes (and so aborts) the engine request now,
            # not whenever the garbage collector finalizes the generator.
            async with contextlib.aclosing(self._run(jobs[0], streams[0])) as outputs:
                async for out in outputs:
                    yield 0, out
            return
        merged: asyncio.Queue = asyncio.Queue()
        _DONE = object()

        async def pump(i: int) -> None:
            try:
                async for out in self._run(jobs[i], streams[i]):
                    merged.put_nowait((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
                merged.put_nowait((i, e))
            finally:
                merged.put_nowait((i, _DONE))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(jobs))]
        try:
            remaining = len(jobs)
            while remaining:
                i, item = await merged.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:  # a client that went away: every job's stream is closed and aborted
                t.cancel()
            self.admission.release(*(j.request_id for j in jobs))  # also those cancelled before they ran
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _respond(self, body: Any, jobs: list[Job], request: Request, chat: bool,
                       plan: Optional[ToolPlan] = None):
        created = int(time.time())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        model = body.model
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chunks(self, jobs, rid, created, model, chat, include_usage,
                                                   plan or ToolPlan()),
                                     media_type="text/event-stream")
        latest: list[Optional[RequestOutput]] = [None] * len(jobs)
        outputs = self.run_all(jobs)
        try:
            async for i, out in outputs:
                latest[i] = out
                if await request.is_disconnected():
                    break
        finally:
            await outputs.aclose()  # aborts whatever has not finished
        if any(f is None or not f.finished for f in latest):
            return JSONResponse(status_code=499, content=error_body("client disconnected", 499,
                                                                    code="client_closed_request"))
        finals: list[RequestOutput] = latest  # type: ignore[assignment]
        failed = failure_message(finals)
        if failed:
            return JSONResponse(status_code=500, content=error_body(failed, 500, code="engine_error"))
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for job, final in zip(jobs, finals):
            prompt_tokens += len(final.prompt_token_ids)
            for c in final.outputs:
                completion_tokens += len(c.token_ids)
                choices.append(self._choice(c, job, final, chat, plan or ToolPlan()))
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    def echo_prompt(self, job: Job, out: RequestOutput) -> Optional[tuple[RequestOutput, str]]:
        return (out, self.tokenizer.decode(job.prompt_ids[:1])) if job.echo is not None else None

    def _choice(self, c: CompletionOutput, job: Job, final: RequestOutput, chat: bool, plan: ToolPlan) -> dict[str, Any]:
        index, params = job.first_choice + c.index, job.params
        logprobs = logprobs_json(c, 0, chat, params.logprobs, self.echo_prompt(job, final)) if params.logprobs is not None else None
        if chat:
            message, finish_reason = reply_message(c.text, c.finish_reason, plan)
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": (job.echo or "") + c.text, "logprobs": logprobs,
                "finish_reason": c.finish_reason}
