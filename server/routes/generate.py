"""POST /v1/generate and /v1/score: the native routes, whose responses carry the whole trace."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from models.decode import PromptTooLongError
from server.auth import GenerateCaller
from server.dependencies import RuntimeDep
from server.generation import (
    GenerationInput,
    PreparedGeneration,
    StreamEnd,
    StreamError,
    StreamItem,
    check_prompt_length,
    commit,
    finished_record,
    generate_once,
    open_stream,
    prepare_generation,
    prepare_score,
    trace_token_dict,
)
from server.errors import error_body
from server.records import generation_body, redact_token, sse_event
from server.schemas import GenerateRequest, GenerateResponse, ScoreRequest
from server.worker import PromptEvent, TokenEvent

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generation"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering events


@router.post("/v1/generate", response_model=GenerateResponse, response_model_exclude_unset=True, responses={
    200: {"description": "The judgment; with stream=true, server-sent events: prompt, token..., judgment "
                         "(or error)."}})
async def generate(body: GenerateRequest, runtime: RuntimeDep, request: Request, caller: GenerateCaller):
    messages = [message.model_dump() for message in body.messages] if body.messages is not None else None
    sampling = GenerationInput(body.prompt, messages, body.max_tokens, body.temperature, body.top_p, body.seed,
                            body.stop or [], policy=body.policy)
    prepared = await prepare_generation(runtime, request, sampling, body.metadata or {},
                                        {"endpoint": "generate", "stream": body.stream}, caller.tenant)
    if not body.stream:
        return generation_body(await generate_once(runtime, prepared), body.include_trace)
    items = await open_stream(runtime, prepared, request)
    return StreamingResponse(_native_events(items, prepared, body.include_trace), media_type="text/event-stream",
                             headers=SSE_HEADERS)


async def _native_events(items, prepared: PreparedGeneration, include_trace: bool):
    async for item in items:
        yield _native_event(item, prepared, include_trace, prepared.withholding)


def _native_event(item: StreamItem, prepared: PreparedGeneration, include_trace: bool, withholding: bool) -> str:
    if isinstance(item, PromptEvent):
        data = {"id": prepared.judgment_id, "seed": prepared.params.seed,
                "prompt_token_count": len(item.prompt_trace)}
        if include_trace:
            data["prompt_tokens"] = [trace_token_dict(token) for token in item.prompt_trace]
        return sse_event(data, "prompt")
    if isinstance(item, TokenEvent):
        data = {"text": item.text}
        if include_trace:
            token = trace_token_dict(item.trace)
            data["token"] = redact_token(token) if withholding else token
        return sse_event(data, "token")
    if isinstance(item, StreamEnd):
        # The final text is whole here, so text held back under a withhold rule needs no event of its own.
        return sse_event(generation_body(item.record, include_trace=False) | {"status": item.record.status},
                         "judgment")
    if isinstance(item, StreamError):
        return sse_event(error_body(item.error), "error")
    raise TypeError(f"unexpected stream item {type(item).__name__}")


@router.post("/v1/score", response_model=GenerateResponse, response_model_exclude_unset=True)
async def score(body: ScoreRequest, runtime: RuntimeDep, request: Request, caller: GenerateCaller) -> dict:
    """Judge a supplied response to a prompt without generating; logged like any judgment."""
    created_at = datetime.now(timezone.utc)
    messages = [message.model_dump() for message in body.messages] if body.messages is not None else None
    prompt_ids, output_ids = await run_in_threadpool(runtime.model.encode_response, body.prompt, messages,
                                                     body.response, body.end_of_turn)
    check_prompt_length(runtime, len(prompt_ids), "prompt" if body.prompt is not None else "messages")
    context_length = runtime.model.base.context_length
    if len(prompt_ids) + len(output_ids) > context_length:
        raise PromptTooLongError(len(prompt_ids), len(output_ids), context_length, supplied_response=True)

    prepared = prepare_score(request.state.request_id, created_at, body, messages, prompt_ids, caller.tenant)
    result = await runtime.worker.score(request.state.request_id, prompt_ids, output_ids)
    record = await commit(runtime, finished_record(runtime, prepared, result, output=body.response))
    return generation_body(record)
