"""OpenAI-compatible routes: chat completions, completions and the model list, with traces attached."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.auth import GenerateCaller, Principal
from server.dependencies import RuntimeDep
from server.errors import ApiError, error_body
from server.generation import (
    GenerationInput,
    PreparedGeneration,
    StreamEnd,
    StreamError,
    generate_once,
    open_stream,
    prepare_generation,
    started_record,
    trace_token_dict,
)
from server.openai_protocol import (
    ChatCompletionRequest,
    ChunkRenderer,
    CompletionRequest,
    OpenAIRequest,
    chat_completion_body,
    completion_body,
)
from server.records import sse_event
from server.routes.generate import SSE_HEADERS
from server.runtime import Runtime
from server.worker import PromptEvent, TokenEvent

logger = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


def served_model(runtime: Runtime) -> dict:
    heads = runtime.model.heads.config
    return {"id": runtime.model.base.name, "object": "model", "created": int(runtime.started_at.timestamp()),
            "owned_by": "tracehead",
            "tracehead": {"model_fingerprint": runtime.model.base.fingerprint,
                          "heads": {"name": heads.name, "fingerprint": runtime.heads_fingerprint,
                                    "constraints": list(heads.constraints),
                                    "thresholds": {name: heads.threshold(name) for name in heads.constraints}}}}


@router.get("/v1/models")
async def list_models(runtime: RuntimeDep, caller: GenerateCaller) -> dict:
    """List the served base model with its head checkpoint."""
    return {"object": "list", "data": [served_model(runtime)]}


@router.get("/v1/models/{model_id}")
async def get_model(model_id: str, runtime: RuntimeDep, caller: GenerateCaller) -> dict:
    _check_model(model_id, runtime)
    return served_model(runtime)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, runtime: RuntimeDep, request: Request,
                           caller: GenerateCaller):
    """OpenAI chat completion; the `tracehead` object carries the judgment and the trace."""
    max_tokens, max_tokens_param = body.token_limit
    sampling = _generation_input(body, None, [message.as_chat_message() for message in body.messages], max_tokens,
                              body.alternatives, max_tokens_param)
    prepared = await _prepare(runtime, request, caller, body, sampling, "chat.completions",
                              logprobs=bool(body.logprobs))
    if not body.stream:
        return chat_completion_body(await generate_once(runtime, prepared), body)
    return await _stream(runtime, prepared, request, body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, runtime: RuntimeDep, request: Request, caller: GenerateCaller):
    """OpenAI (legacy) text completion of a raw prompt, with the `tracehead` object."""
    sampling = _generation_input(body, body.prompt_text, None, body.max_tokens, body.logprobs or 0, "max_tokens")
    prepared = await _prepare(runtime, request, caller, body, sampling, "completions",
                              logprobs=body.logprobs is not None)
    if not body.stream:
        return completion_body(await generate_once(runtime, prepared), body)
    return await _stream(runtime, prepared, request, body)


def _generation_input(body: OpenAIRequest, prompt: str | None, messages: list[dict] | None, max_tokens: int | None,
                      top_logprobs: int, max_tokens_param: str) -> GenerationInput:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return GenerationInput(prompt, messages, max_tokens, temperature, top_p, body.seed, body.stop or [],
                           top_logprobs=top_logprobs, policy=body.policy, max_tokens_param=max_tokens_param)


async def _prepare(runtime: Runtime, request: Request, caller: Principal, body: OpenAIRequest,
                   sampling: GenerationInput, endpoint: str, logprobs: bool) -> PreparedGeneration:
    _check_model(body.model, runtime)
    body.check_combinations()
    if body.model_extra:
        logger.debug("Request %s: ignored fields %s", request.state.request_id, ", ".join(sorted(body.model_extra)))
    parameters = {"endpoint": endpoint, "stream": bool(body.stream), "logprobs": logprobs}
    if body.user is not None:
        parameters["user"] = body.user
    return await prepare_generation(runtime, request, sampling, body.metadata or {}, parameters, caller.tenant)


def _check_model(model_id: str, runtime: Runtime) -> None:
    served = runtime.model.base.name
    if model_id != served:
        raise ApiError(404, f"model {model_id[:100]!r} is not served here; this server serves {served!r} "
                       f"(GET /v1/models lists it); send model={served!r}", param="model", code="model_not_found")


async def _stream(runtime: Runtime, prepared: PreparedGeneration, request: Request,
                  body: ChatCompletionRequest | CompletionRequest) -> StreamingResponse:
    items = await open_stream(runtime, prepared, request)
    renderer = ChunkRenderer(started_record(runtime, prepared), body, prepared.withholding)

    async def events():
        async for item in items:
            if isinstance(item, PromptEvent):
                yield sse_event(renderer.prompt([trace_token_dict(token) for token in item.prompt_trace]))
            elif isinstance(item, TokenEvent):
                yield sse_event(renderer.token(item.text, trace_token_dict(item.trace)))
            elif isinstance(item, StreamEnd):
                for chunk in renderer.end(item.record, item.unsent_text):
                    yield sse_event(chunk)
                yield sse_event("[DONE]")
            elif isinstance(item, StreamError):
                yield sse_event(error_body(item.error))

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
