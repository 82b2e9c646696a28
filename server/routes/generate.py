"""POST /v1/generate: generate text with its constraint trace, committed before the response."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from models.decode import PromptTooLongError, SamplingParams
from models.judgment import assemble_judgment
from server.dependencies import RuntimeDep
from server.errors import ApiError
from server.records import build_record, generation_body
from server.schemas import GenerateRequest, GenerateResponse, ScoreRequest
from server.settings import Settings
from server.store import new_judgment_id

logger = logging.getLogger(__name__)
router = APIRouter(tags=["generation"])


def sampling_params(body: GenerateRequest, settings: Settings) -> SamplingParams:
    if body.max_tokens is None:
        max_tokens = min(settings.default_max_tokens, settings.max_tokens_limit)
    else:
        max_tokens = body.max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(422, f"max_tokens is {max_tokens}, above this server's limit of {settings.max_tokens_limit}; "
                       "ask for fewer tokens", param="max_tokens", code="invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, seed=body.seed, stop=body.stop or [])


@router.post("/v1/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, runtime: RuntimeDep, request: Request) -> dict:
    created_at = datetime.now(timezone.utc)
    params = sampling_params(body, runtime.settings)
    messages = [message.model_dump() for message in body.messages] if body.messages is not None else None
    input_ids = await run_in_threadpool(runtime.model.encode, body.prompt, messages)
    context_length = runtime.model.base.context_length
    if body.max_tokens is None and len(input_ids) < context_length:
        params.max_tokens = min(params.max_tokens, context_length - len(input_ids))
    if len(input_ids) + params.max_tokens > context_length:
        raise PromptTooLongError(len(input_ids), params.max_tokens, context_length)

    request_id = request.state.request_id
    result = await runtime.worker.generate(request_id, input_ids, params)
    judgment = assemble_judgment(result.output_trace, result.prompt_trace, runtime.model.heads.config)

    parameters = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                  "seed": result.seed, "seed_from_request": params.seed is not None, "stop": params.stop}
    record = build_record(new_judgment_id(), request_id, created_at, body, parameters, result, judgment,
                          runtime.model, runtime.heads_fingerprint, kind="generation", output=result.text)
    return await commit_and_render(runtime, record)


async def commit_and_render(runtime, record) -> dict:
    """Commit the record, then render the response: no output leaves without a record."""
    await run_in_threadpool(runtime.store.save, record)
    logger.info("Request %s committed judgment %s (kind=%s, flagged=%s)", record.request_id, record.id, record.kind,
                record.flagged)
    return generation_body(record)


@router.post("/v1/score", response_model=GenerateResponse)
async def score(body: ScoreRequest, runtime: RuntimeDep, request: Request) -> dict:
    """Judge a supplied response to a prompt without generating; logged like any judgment."""
    created_at = datetime.now(timezone.utc)
    messages = [message.model_dump() for message in body.messages] if body.messages is not None else None
    prompt_ids, output_ids = await run_in_threadpool(runtime.model.encode_response, body.prompt, messages,
                                                     body.response, body.end_of_turn)
    context_length = runtime.model.base.context_length
    if len(prompt_ids) + len(output_ids) > context_length:
        raise PromptTooLongError(len(prompt_ids), len(output_ids), context_length, supplied_response=True)

    result = await runtime.worker.score(request.state.request_id, prompt_ids, output_ids)
    judgment = assemble_judgment(result.output_trace, result.prompt_trace, runtime.model.heads.config)
    record = build_record(new_judgment_id(), request.state.request_id, created_at, body,
                          {"end_of_turn": body.end_of_turn}, result, judgment, runtime.model,
                          runtime.heads_fingerprint, kind="score", output=body.response)
    return await commit_and_render(runtime, record)
