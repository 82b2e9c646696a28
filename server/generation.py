"""One accepted generation, from a validated request to its committed record, streamed or not.

Every route (native and OpenAI-compatible) turns its request into a
PreparedGeneration and hands it here, so that the record rules hold the same
way everywhere:

- not streamed: generate, commit the record, then respond;
- streamed: commit a started record before the first token leaves, complete
  it at the end, or mark it cancelled with the tokens so far when the client
  disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from models.decode import ConstraintModel, PromptTooLongError, SamplingParams, TokenTrace
from models.judgment import assemble_judgment
from server.errors import ApiError, map_exception
from server.policy import Policy, apply_policy, check_policy, effective_policy, stop_scores
from server.runtime import Runtime
from server.schemas import MAX_SEED, ScoreRequest
from server.store import JudgmentRecord, VerdictRecord, new_judgment_id
from server.worker import GenerationResult, PromptEvent, TokenEvent, TokenStream

logger = logging.getLogger(__name__)

class ModelIdentity(Protocol):
    """The model and heads fingerprint that a record names; a Runtime is one."""

    model: ConstraintModel
    heads_fingerprint: str


@dataclass
class PreparedGeneration:
    """An accepted request: what the worker runs and what its record stores."""

    judgment_id: str
    request_id: str
    created_at: datetime
    kind: str  # "generation", or "score" for a supplied response
    input: dict  # {"prompt": ...} or {"messages": [...]}, as sent
    metadata: dict[str, str]
    parameters: dict  # stored with the record: the sampling settings used and route details
    policy: Policy
    input_ids: list[int]
    params: SamplingParams | None  # None for a score, which samples nothing
    tenant: str = "default"  # the caller's tenant, whose audit reads will see the record

    @property
    def withholding(self) -> bool:
        """A withhold rule applies, so no text may leave before the end shows it did not trigger."""
        return any(rule.action == "withhold" for rule in self.policy.values())


@dataclass
class GenerationInput:
    """The sampling fields of a request, whichever route it came through."""

    prompt: str | None
    messages: list[dict] | None
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    top_logprobs: int = 0
    policy: Policy | None = None
    max_tokens_param: str = "max_tokens"  # the field name to use in errors


async def prepare_generation(runtime: Runtime, request: Request, sampling: GenerationInput, metadata: dict[str, str],
                             route_parameters: dict, tenant: str) -> PreparedGeneration:
    """Check the request against the limits, tokenize it and fix its seed; raise ApiError when it does not fit."""
    settings, model = runtime.settings, runtime.model
    created_at = datetime.now(timezone.utc)
    max_tokens = sampling.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise ApiError(422, f"{sampling.max_tokens_param} is {max_tokens}, above this server's limit of "
                       f"{settings.max_tokens_limit}; ask for fewer tokens", param=sampling.max_tokens_param,
                       code="invalid_value")
    input_ids = await run_in_threadpool(model.encode, sampling.prompt, sampling.messages)
    check_prompt_length(runtime, len(input_ids), "prompt" if sampling.prompt is not None else "messages")
    context_length = model.base.context_length
    if max_tokens is None:
        # Left out: the server default, cut to what the context still holds.
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
        if len(input_ids) < context_length:
            max_tokens = min(max_tokens, context_length - len(input_ids))
    if len(input_ids) + max_tokens > context_length:
        error = PromptTooLongError(len(input_ids), max_tokens, context_length)
        error.param = "prompt" if sampling.prompt is not None else "messages"
        raise error

    # A drawn seed is fixed here, so that even the started record of a stream can replay the request.
    seed = sampling.seed if sampling.seed is not None else secrets.randbelow(MAX_SEED)
    policy = effective_policy(check_policy(sampling.policy or {}, model.constraints, "policy"), settings.policy)
    params = SamplingParams(max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=seed,
                            stop=sampling.stop, min_scores=stop_scores(policy), top_logprobs=sampling.top_logprobs)
    parameters = {"max_tokens": max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed,
                  "seed_from_request": sampling.seed is not None, "stop": sampling.stop} | route_parameters
    if sampling.top_logprobs:
        parameters["top_logprobs"] = sampling.top_logprobs
    model_input = {"prompt": sampling.prompt} if sampling.prompt is not None else {"messages": sampling.messages}
    return PreparedGeneration(new_judgment_id(), request.state.request_id, created_at, "generation", model_input,
                              metadata, parameters, policy, input_ids, params, tenant)


def check_prompt_length(runtime: Runtime, prompt_tokens: int, param: str) -> None:
    """Raise a 400 ApiError when the tokenized prompt is longer than max_prompt_tokens.

    Unset, the limit is the context length, which the context check (PromptTooLongError) enforces.
    """
    limit = runtime.settings.max_prompt_tokens
    if limit is not None and prompt_tokens > limit:
        raise ApiError(400, f"{param} has {prompt_tokens} tokens after tokenization, above this server's limit of "
                       f"{limit} prompt tokens (TRACEHEAD_MAX_PROMPT_TOKENS); shorten it", param=param, code="prompt_too_long")


def prepare_score(request_id: str, created_at: datetime, body: ScoreRequest, messages: list[dict] | None,
                  prompt_ids: list[int], tenant: str = "default") -> PreparedGeneration:
    """Accept a request to judge a supplied response; nothing is sampled and no policy applies."""
    model_input = {"prompt": body.prompt} if body.prompt is not None else {"messages": messages}
    return PreparedGeneration(new_judgment_id(), request_id, created_at, "score", model_input, body.metadata or {},
                              {"end_of_turn": body.end_of_turn}, {}, prompt_ids, None, tenant)


def trace_token_dict(trace: TokenTrace) -> dict:
    token = {"position": trace.position, "token_id": trace.token_id, "text": trace.text, "logprob": trace.logprob,
             "scores": trace.scores,
             "attention": {c: [[position, weight] for position, weight in pairs]
                           for c, pairs in trace.attention.items()}}
    if trace.top_logprobs is not None:
        token["top_logprobs"] = [[token_id, text, logprob] for token_id, text, logprob in trace.top_logprobs]
    return token


def _record(model: ModelIdentity, prepared: PreparedGeneration, **fields) -> JudgmentRecord:
    base = dict(id=prepared.judgment_id, created_at=prepared.created_at, request_id=prepared.request_id,
                model_name=model.model.base.name, model_fingerprint=model.model.base.fingerprint,
                heads_name=model.model.heads.config.name, heads_fingerprint=model.heads_fingerprint,
                prompt=prepared.input, parameters=prepared.parameters | {"top_k_attention": model.model.top_k_attention},
                prompt_tokens=len(prepared.input_ids), metadata=prepared.metadata, kind=prepared.kind,
                tenant=prepared.tenant)
    return JudgmentRecord(**(base | fields))


def started_record(runtime: ModelIdentity, prepared: PreparedGeneration) -> JudgmentRecord:
    """Build the record a stream commits before its first token: the request, nothing generated yet."""
    policy = {"rules": {name: rule.model_dump() for name, rule in prepared.policy.items()}}
    return _record(runtime, prepared, completed_at=None, output="", finish_reason=None, status="started",
                   completion_tokens=0, latency_ms=None, flagged=False, verdicts=[], trace=None,
                   policy=policy if prepared.policy else None)


def finished_record(runtime: ModelIdentity, prepared: PreparedGeneration, result: GenerationResult,
                    output: str | None = None) -> JudgmentRecord:
    """Build the complete record of a generation (or of a scored ``output``), judged and with the policy applied.

    A generation cancelled before it ran has no trace, so nothing is judged and no verdict stored.
    """
    completed_at = datetime.now(timezone.utc)
    config = runtime.model.heads.config
    judgment = assemble_judgment(result.output_trace, result.prompt_trace, config) if result.prompt_trace else None
    outcome = apply_policy(prepared.policy, result.output_trace)
    finish_reason = "constraint" if outcome.withheld and result.finish_reason != "cancelled" else result.finish_reason
    verdicts = [VerdictRecord(v.constraint, v.score, v.min_score, v.min_position, v.threshold, v.passed)
                for v in (judgment.verdicts if judgment else [])]
    trace = {"constraints": list(config.constraints),
             "prompt_tokens": [trace_token_dict(t) for t in result.prompt_trace],
             "output_tokens": [trace_token_dict(t) for t in result.output_trace]}
    return _record(runtime, prepared, completed_at=completed_at, output=result.text if output is None else output,
                   finish_reason=finish_reason, status="cancelled" if result.finish_reason == "cancelled" else "completed",
                   completion_tokens=len(result.output_trace),
                   latency_ms=round((completed_at - prepared.created_at).total_seconds() * 1000, 3),
                   flagged=bool(judgment and judgment.flagged) or bool(outcome.triggered), verdicts=verdicts,
                   trace=trace, policy=outcome.as_dict() if prepared.policy else None)


def failed_record(runtime: ModelIdentity, prepared: PreparedGeneration) -> JudgmentRecord:
    """Build the record of a streamed generation that failed in the worker; nothing generated is kept."""
    completed_at = datetime.now(timezone.utc)
    return _record(runtime, prepared, completed_at=completed_at, output="", finish_reason="error", status="failed",
                   completion_tokens=0, latency_ms=round((completed_at - prepared.created_at).total_seconds() * 1000, 3),
                   flagged=False, verdicts=[], trace=None, policy=None)


async def commit(runtime: Runtime, record: JudgmentRecord) -> JudgmentRecord:
    """Commit a one-shot record; only then may its output leave the server."""
    with runtime.metrics.audit_write("save"):
        await run_in_threadpool(runtime.store.save, record)
    runtime.metrics.observe_committed(record)
    logger.info("Request %s committed judgment %s (kind=%s, flagged=%s, finish=%s)", record.request_id, record.id,
                record.kind, record.flagged, record.finish_reason, extra={"judgment_id": record.id})
    return record


async def generate_once(runtime: Runtime, prepared: PreparedGeneration) -> JudgmentRecord:
    generation = asyncio.ensure_future(runtime.worker.generate(prepared.request_id, prepared.input_ids,
                                                               prepared.params))
    try:
        result = await asyncio.shield(generation)
    except asyncio.CancelledError:
        # The request was cut off (uvicorn does so at the end of the shutdown grace period). The
        # generation goes on, or is cancelled by shut_down(), and its record is committed all the same.
        _keep(asyncio.create_task(_commit_when_done(runtime, prepared, generation)))
        raise
    runtime.metrics.observe_generation(result)
    return await commit(runtime, finished_record(runtime, prepared, result))


async def _commit_when_done(runtime: Runtime, prepared: PreparedGeneration, generation: asyncio.Future) -> None:
    try:
        record = await commit(runtime, finished_record(runtime, prepared, await generation))
    except Exception:
        logger.exception("Request %s: the record of a cut-off generation was not committed", prepared.request_id)
        return
    logger.info("Request %s was cut off; its judgment %s is committed as %s", prepared.request_id, record.id,
                record.status, extra={"judgment_id": record.id})


def _keep(task: asyncio.Task) -> None:
    """Hold a background task until it ends, so that shut_down() can wait for it."""
    _drivers.add(task)
    task.add_done_callback(_drivers.discard)


# Streaming

@dataclass
class StreamEnd:
    """The last item of a stream: its completed (or cancelled) record, committed."""

    record: JudgmentRecord
    unsent_text: str  # text held back while a withhold rule could still trigger, released now


@dataclass
class StreamError:
    """The stream failed after it began; the client gets this error event, then the stream ends."""

    error: ApiError


StreamItem = PromptEvent | TokenEvent | StreamEnd | StreamError

# Drivers keep running after their client disconnects, to commit the cancelled record;
# holding them here keeps the event loop from dropping them.
_drivers: set[asyncio.Task] = set()


async def open_stream(runtime: Runtime, prepared: PreparedGeneration, request: Request) -> AsyncIterator[StreamItem]:
    """Queue the generation and commit its started record; return the items to send.

    Raises before anything is sent: QueueFullError when the queue is full, and
    StoreUnavailableError when the started record cannot be committed (the
    queued generation is then cancelled).
    """
    stream = runtime.worker.stream(prepared.request_id, prepared.input_ids, prepared.params)
    try:
        with runtime.metrics.audit_write("start"):
            await run_in_threadpool(runtime.store.start, started_record(runtime, prepared))
    except BaseException:
        stream.cancel()
        raise
    logger.info("Request %s started streamed judgment %s", prepared.request_id, prepared.judgment_id,
                extra={"judgment_id": prepared.judgment_id})

    items: asyncio.Queue[StreamItem | None] = asyncio.Queue()
    driver = asyncio.create_task(_drive(runtime, prepared, stream, items))
    _keep(driver)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, stream, prepared))
    return _relay(items, stream, watcher)


async def _relay(items: asyncio.Queue, stream: TokenStream, watcher: asyncio.Task) -> AsyncIterator[StreamItem]:
    try:
        while (item := await items.get()) is not None:
            yield item
    finally:
        stream.cancel()  # ends a generation whose client went away; does nothing after the end
        watcher.cancel()


async def _cancel_on_disconnect(request: Request, stream: TokenStream, prepared: PreparedGeneration) -> None:
    """Cancel the generation as soon as the client disconnects (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()
    logger.debug("Request %s: client disconnected from judgment %s", prepared.request_id, prepared.judgment_id)


async def _drive(runtime: Runtime, prepared: PreparedGeneration, stream: TokenStream,
                 items: asyncio.Queue) -> None:
    """Pass the worker's events on, then complete the started record and send the end (or an error)."""
    withholding = prepared.withholding
    held_text: list[str] = []
    try:
        async for event in stream:
            if withholding and isinstance(event, TokenEvent):
                held_text.append(event.text)
                event = TokenEvent(event.trace, "")
            items.put_nowait(event)
        try:
            result = await stream.result()
        except Exception as exc:
            logger.error("Request %s: generation of judgment %s failed", prepared.request_id, prepared.judgment_id,
                         extra={"judgment_id": prepared.judgment_id})
            await _finish(runtime, failed_record(runtime, prepared))
            items.put_nowait(StreamError(map_exception(exc, prepared.request_id)))
            return
        runtime.metrics.observe_generation(result)
        record = finished_record(runtime, prepared, result)
        await _finish(runtime, record)
        withheld = bool(record.policy and record.policy["withheld"])
        items.put_nowait(StreamEnd(record, "" if withheld else "".join(held_text)))
    except Exception as exc:  # the final commit failed: the record stays visibly started
        items.put_nowait(StreamError(map_exception(exc, prepared.request_id)))
    finally:
        items.put_nowait(None)


async def shut_down(runtime: Runtime) -> None:
    """Cancel the generations still running as the server stops, commit their records, then stop the worker.

    uvicorn calls this after its grace period (shutdown_grace_s), so what still runs here has overrun it.
    A cancelled stream's driver commits the cancelled record with the tokens so far. A non-streamed
    request was already cut off by uvicorn and sent no output; its record is committed the same way.
    """
    runtime.worker.cancel_all()
    if _drivers:
        _, pending = await asyncio.wait(set(_drivers), timeout=runtime.settings.shutdown_grace_s)
        if pending:
            logger.error("%d streamed judgments were not finished at shutdown and stay started", len(pending))
    # Joining the worker thread blocks, and the event loop must stay free for any driver still committing.
    await run_in_threadpool(runtime.close)
    logger.info("tracehead stopped")


async def _finish(runtime: Runtime, record: JudgmentRecord) -> None:
    with runtime.metrics.audit_write("finish"):
        await run_in_threadpool(runtime.store.finish, record)
    runtime.metrics.observe_committed(record)
    logger.info("Request %s %s judgment %s (flagged=%s, finish=%s)", record.request_id,
                "cancelled" if record.status == "cancelled" else "completed", record.id, record.flagged,
                record.finish_reason, extra={"judgment_id": record.id})
