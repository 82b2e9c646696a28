"""Request schemas and response bodies of the OpenAI-compatible routes.

Requests follow OpenAI's chat completions and (legacy) completions shapes.
Fields that OpenAI clients commonly send and that change nothing here are
accepted and logged at DEBUG; fields whose meaning this server cannot honour
(n > 1, tools, penalties, JSON response formats) get a 400 naming the field.

Every response carries the standard fields plus a ``tracehead`` object: the
judgment id, the model and heads with their fingerprints, the seed, the
judgment summary and (unless ``include_trace`` is false) the trace.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.errors import ApiError

from server.policy import Policy
from server.records import identity, judgment_summary, redact_token, response_trace, usage
from server.schemas import MAX_SEED, Metadata, StopSequences, UnicodeText
from server.store import JudgmentRecord

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for completions


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, description="Send a last chunk with the token usage before [DONE].")


class OpenAIRequest(BaseModel):
    """Fields shared by chat completions and completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The id listed by GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True)
    stop: StopSequences | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    user: str | None = Field(None, max_length=256, description="Stored with the judgment's parameters.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty map is supported.")
    metadata: Metadata | None = None
    include_trace: bool = Field(True, strict=True, description="tracehead: false leaves the trace out.")
    policy: Policy | None = Field(None, description="tracehead: constraint policy, as on POST /v1/generate.")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        _require(value in (None, 1), "only n=1 is supported: this server returns one choice per request; "
                 "repeat the request for more choices")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        _require(value in (None, 0), "penalties are not supported; leave the field out or send 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict | None) -> dict | None:
        _require(not value, "logit bias is not supported; leave logit_bias out")
        return value

    def check_combinations(self) -> None:
        """Checks across fields, raised as ApiError so that the error names the field to change."""


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise ValueError(reason)


def _conflict(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise ApiError(422, message, param=param, code="invalid_value")


class ChatCompletionMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    # "developer" is OpenAI's newer name for "system"; tool messages need tool calls, which this server has none of.
    role: Literal["system", "developer", "user", "assistant"]
    content: UnicodeText = Field(description='A string, or a list of {"type": "text", "text": ...} parts.')
    name: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value):
        """Join a list of text parts into one string; the model reads text only."""
        if not isinstance(value, list):
            return value
        texts = []
        for index, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            _require(kind == "text" and isinstance(part.get("text"), str),
                     f"content part {index} has type {str(kind)[:40]!r}; this text-only model reads parts of "
                     'type "text" with a string "text" field')
            texts.append(part["text"])
        return "".join(texts)

    def as_chat_message(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"] = Field(description="Only plain text: this server does not constrain output to JSON.")


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatCompletionMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="Newer name of max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = Field(None, description="Only an empty list: this server calls no tools.")
    tool_choice: Literal["none", "auto"] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list[dict] | None) -> list[dict] | None:
        _require(not value, f"this server calls no tools, but the request lists {len(value or [])}; leave tools out")
        return value

    def check_combinations(self) -> None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            _conflict(self.max_tokens == self.max_completion_tokens, "max_tokens",
                      f"max_tokens={self.max_tokens} differs from max_completion_tokens="
                      f"{self.max_completion_tokens}; send only one of the two")
        _conflict(self.top_logprobs is None or bool(self.logprobs), "top_logprobs",
                  f"top_logprobs={self.top_logprobs} needs logprobs=true; add it or leave top_logprobs out")

    @property
    def token_limit(self) -> tuple[int | None, str]:
        """The requested max tokens and the field name that set it."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def alternatives(self) -> int:
        """Alternatives to record per token: 0 when logprobs were not asked for."""
        return (self.top_logprobs or 0) if self.logprobs else 0


class CompletionRequest(OpenAIRequest):
    prompt: UnicodeText | list[UnicodeText] = Field(description="A string, or a list holding exactly one string.")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS, strict=True,
                                 description="Return logprobs with this many alternatives per token.")
    echo: bool | None = Field(False, description="Put the prompt before the completion in `text`.")
    suffix: str | None = Field(None, description="Not supported; leave it out.")
    best_of: int | None = Field(None, description="Only 1 is supported.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        _require(isinstance(value, str) or len(value) == 1,
                 f"send one prompt per request, as a string; got a list of {len(value)}")
        text = value if isinstance(value, str) else value[0]
        _require(bool(text.strip()), "prompt must not be empty or only whitespace")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        _require(value is None, "insertion is not supported; leave suffix out")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        _require(value in (None, 1), "only best_of=1 is supported: this server returns one choice per request")
        return value

    def check_combinations(self) -> None:
        _conflict(not (self.echo and self.logprobs is not None), "echo",
                  "echo=true together with logprobs is not supported; leave one of the two out")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# Responses

def system_fingerprint(record: JudgmentRecord) -> str:
    """OpenAI's name for the backend configuration: here, the model and heads fingerprints together."""
    digest = hashlib.sha256(f"{record.model_fingerprint}\n{record.heads_fingerprint}".encode()).hexdigest()
    return f"fp_{digest[:16]}"


def _identity_extension(record: JudgmentRecord) -> dict:
    """Build the part of the extension that names the judgment and what produced it."""
    ids = identity(record)
    return {"judgment_id": record.id, "model": {"name": ids["model"], "fingerprint": ids["model_fingerprint"]},
            "heads": {"name": ids["heads"], "fingerprint": ids["heads_fingerprint"]}, "seed": ids["seed"]}


def tracehead_extension(record: JudgmentRecord, include_trace: bool) -> dict:
    """Build the extension object of a complete response: judgment id and summary, identity, trace."""
    extension = _identity_extension(record) | {
        "status": record.status,
        "judgment": judgment_summary(record, record.trace["constraints"] if record.trace else None)}
    if include_trace and record.trace is not None:
        extension["trace"] = response_trace(record)
    return extension


def _envelope(record: JudgmentRecord, object_name: str) -> dict:
    return {"id": record.id, "object": object_name, "created": int(record.created_at.timestamp()),
            "model": record.model_name, "system_fingerprint": system_fingerprint(record)}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[dict]) -> dict:
    """OpenAI's chat logprobs object from stored trace tokens."""
    content = [{"token": token["text"], "logprob": token["logprob"], "bytes": _token_bytes(token["text"]),
                "top_logprobs": [{"token": text, "logprob": logprob, "bytes": _token_bytes(text)}
                                 for _, text, logprob in token.get("top_logprobs", [])]}
               for token in tokens]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: list[dict], text_offset: int) -> dict:
    """OpenAI's legacy completions logprobs object from stored trace tokens."""
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token["text"])
    return {"tokens": [token["text"] for token in tokens], "token_logprobs": [token["logprob"] for token in tokens],
            "top_logprobs": [{text: logprob for _, text, logprob in token.get("top_logprobs", [])} for token in tokens],
            "text_offset": offsets}


def chat_completion_body(record: JudgmentRecord, request: ChatCompletionRequest) -> dict:
    withheld = bool(record.policy and record.policy.get("withheld"))
    logprobs = chat_logprobs(record.trace["output_tokens"]) if request.logprobs and not withheld else None
    choice = {"index": 0, "message": {"role": "assistant", "content": None if withheld else record.output,
                                      "refusal": None},
              "logprobs": logprobs, "finish_reason": record.finish_reason}
    return _envelope(record, "chat.completion") | {"choices": [choice], "usage": usage(record),
                                                   "tracehead": tracehead_extension(record, request.include_trace)}


def completion_body(record: JudgmentRecord, request: CompletionRequest) -> dict:
    withheld = bool(record.policy and record.policy.get("withheld"))
    prefix = request.prompt_text if request.echo else ""
    logprobs = None
    if request.logprobs is not None and not withheld:
        logprobs = completion_logprobs(record.trace["output_tokens"], 0)
    choice = {"index": 0, "text": None if withheld else prefix + record.output, "logprobs": logprobs,
              "finish_reason": record.finish_reason}
    return _envelope(record, "text_completion") | {"choices": [choice], "usage": usage(record),
                                                   "tracehead": tracehead_extension(record, request.include_trace)}


class ChunkRenderer:
    """Turns a stream's items into OpenAI chunks (chat or legacy completions) as server-sent events."""

    def __init__(self, started: JudgmentRecord, request: ChatCompletionRequest | CompletionRequest, withholding: bool):
        self.chat = isinstance(request, ChatCompletionRequest)
        self.request, self.withholding = request, withholding
        self.envelope = _envelope(started, "chat.completion.chunk" if self.chat else "text_completion")
        self.started = started

    def prompt(self, prompt_tokens: list[dict]) -> dict:
        extension = _identity_extension(self.started)
        if self.request.include_trace:
            extension["prompt_tokens"] = prompt_tokens
        echo = "" if self.chat or not self.request.echo else self.request.prompt_text
        return self._chunk({"role": "assistant", "content": ""} if self.chat else echo, None, None) | {
            "tracehead": extension}

    def token(self, text: str, token: dict) -> dict:
        logprobs = None
        if self._wants_logprobs and not self.withholding:
            logprobs = chat_logprobs([token]) if self.chat else completion_logprobs([token], 0)
        chunk = self._chunk({"content": text} if self.chat else text, logprobs, None)
        if self.request.include_trace:
            chunk["tracehead"] = {"token": redact_token(token) if self.withholding else token}
        return chunk

    def end(self, record: JudgmentRecord, unsent_text: str) -> list[dict]:
        chunks = [self._chunk({"content": unsent_text} if self.chat else unsent_text, None, None)] if unsent_text else []
        extension = tracehead_extension(record, include_trace=False)
        chunks.append(self._chunk({} if self.chat else "", None, record.finish_reason) | {"tracehead": extension})
        if self.request.stream_options and self.request.stream_options.include_usage:
            chunks.append(self.envelope | {"choices": [], "usage": usage(record)})
        return chunks

    @property
    def _wants_logprobs(self) -> bool:
        return bool(self.request.logprobs) if self.chat else self.request.logprobs is not None

    def _chunk(self, delta: dict | str, logprobs: dict | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        return self.envelope | {"choices": [choice | {"logprobs": logprobs, "finish_reason": finish_reason}]}
