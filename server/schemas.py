"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from server.policy import Policy

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 64
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512
MAX_SEED = 2**63 - 1


def _check_unicode(name: str, value: str) -> None:
    """Raise ValueError for a lone surrogate, which JSON can escape ("\\ud800") but UTF-8 cannot encode.

    The tokenizer rejects such text, and a stored one would make every later read of the judgment fail.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} has a lone surrogate at character {exc.start}. Send valid Unicode text.") from None


def _unicode_text(value: str) -> str:
    _check_unicode("the text", value)
    return value


# A string field that rejects lone surrogates; the error location names the field.
UnicodeText = Annotated[str, AfterValidator(_unicode_text)]


def _check_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_METADATA_KEYS:
        raise ValueError(f"at most {MAX_METADATA_KEYS} metadata keys are allowed, got {len(value)}")
    for key, item in value.items():
        if not key or len(key) > MAX_METADATA_KEY_LENGTH:
            raise ValueError(f"metadata key {key[:80]!r} must be 1 to {MAX_METADATA_KEY_LENGTH} characters")
        _check_unicode("metadata key", key)
        _check_unicode(f"metadata value of {key!r}", item)
        if len(item) > MAX_METADATA_VALUE_LENGTH:
            raise ValueError(f"metadata value of {key!r} is {len(item)} characters; the limit is {MAX_METADATA_VALUE_LENGTH}")
    return value


# String pairs stored with the judgment, searchable by auditors.
Metadata = Annotated[dict[str, str], AfterValidator(_check_metadata)]


def _stop_as_list(value):
    return [value] if isinstance(value, str) else value


def _check_stop(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(value)}")
    for sequence in value:
        if not sequence:
            raise ValueError("stop sequences must not be empty strings")
        _check_unicode("stop sequence", sequence)
        if len(sequence) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_LENGTH} characters, got {len(sequence)}")
    return value


# One string or a list of them; generation ends where one appears, and it is cut from the text.
StopSequences = Annotated[list[str], BeforeValidator(_stop_as_list), AfterValidator(_check_stop)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: UnicodeText = Field(max_length=1_000_000)


class PromptInput(BaseModel):
    """Model input: exactly one of ``prompt`` (raw text) or ``messages`` (chat template applied)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Raw prompt text, sent to the model as it is.")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="Chat messages; the model's chat template is applied.")
    metadata: Metadata | None = Field(None, description=f"Up to {MAX_METADATA_KEYS} string pairs stored with the judgment.")

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("prompt must not be empty or only whitespace")
        _check_unicode("prompt", value)
        return value

    @model_validator(mode="after")
    def _exactly_one_input(self) -> "PromptInput":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of `prompt` or `messages`")
        return self


class GenerateRequest(PromptInput):
    """A generation request."""

    max_tokens: int | None = Field(None, ge=1, strict=True, description="Maximum number of tokens to generate; by default the rest of the context, capped at the server's default_max_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1].")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True, description="Seed for reproducible sampling; the used seed is stored either way.")
    stop: StopSequences | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} strings that end generation; not included in the text.")
    stream: bool = Field(False, strict=True, description="Send server-sent events: the prompt, each token with its trace, then the judgment.")
    include_trace: bool = Field(True, strict=True, description="false leaves the per-token trace out of the response; the store keeps it.")
    policy: Policy | None = Field(None, description="Per constraint a min_score and an action (flag, stop, withhold); replaces the server default's rules for the constraints it names.")


class ScoreRequest(PromptInput):
    """A text to judge without generating: the prompt it answered and the response itself."""

    response: UnicodeText = Field(min_length=1, max_length=1_000_000, description="The output to judge, as the model's turn.")
    end_of_turn: bool = Field(True, strict=True, description=(
        "Append the end-of-turn token after the response, as a generation that stopped on its own ends; "
        "false for a response that was cut off."))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ConstraintVerdict(BaseModel):
    score: float = Field(description="Score of the last judged token, in [0, 1].")
    min_score: float = Field(description="Lowest score over the judged tokens.")
    min_position: int = Field(description="Sequence position of the lowest-scoring token.")
    threshold: float = Field(description="Calibrated threshold of the head checkpoint.")
    passed: bool = Field(description="score >= threshold.")


class TriggeredRule(BaseModel):
    constraint: str
    action: Literal["flag", "stop", "withhold"]
    position: int = Field(description="Sequence position of the first generated token below min_score.")
    score: float = Field(description="That token's score.")
    min_score: float


class PolicyOutcomeBody(BaseModel):
    rules: Policy = Field(description="The rules applied: the server default merged with the request's.")
    triggered: list[TriggeredRule] = Field(None, description="Rules whose minimum a generated token fell below.")
    withheld: bool = Field(None, description="True when a withhold rule kept the text from the client.")


class JudgmentSummary(BaseModel):
    flagged: bool = Field(description="True when any constraint failed or any policy rule triggered.")
    constraints: dict[str, ConstraintVerdict]
    policy: PolicyOutcomeBody | None = Field(description="The constraint policy and what it did; null without rules.")


class TraceToken(BaseModel):
    position: int = Field(description="Index in the whole prompt + output sequence.")
    token_id: int | None = Field(description="Null in a response whose text was withheld.")
    text: str | None = Field(description="The token's text piece; null in a response whose text was withheld.")
    logprob: float | None = Field(description="Log-probability under the model; null for prompt tokens.")
    scores: dict[str, float] = Field(description="Score per constraint after this token.")
    attention: dict[str, list[tuple[int, float]]] = Field(
        description="Per constraint, the most attended earlier positions as [position, weight], heaviest first.")
    top_logprobs: list[tuple[int, str, float]] = Field(None, description=(
        "Only when requested: the most likely tokens at this position as [token_id, text, logprob]."))


class Trace(BaseModel):
    constraints: list[str]
    prompt_tokens: list[TraceToken]
    output_tokens: list[TraceToken]


class GenerateResponse(BaseModel):
    id: str = Field(description="Judgment id; GET /v1/judgments/{id} returns the stored record.")
    object: Literal["judgment"] = "judgment"
    created_at: datetime
    model: str
    model_fingerprint: str = Field(description="sha256 over the base model's tensors.")
    heads: str
    heads_fingerprint: str = Field(description="sha256 over the head checkpoint's tensors.")
    seed: int | None = Field(description="The sampling seed (drawn when the request set none); null for a score.")
    kind: Literal["generation", "score"] = Field(description="A generation, or a score of a supplied response.")
    text: str | None = Field(description="The output; null when a withhold rule triggered.")
    finish_reason: Literal["stop", "length", "constraint", "supplied"] = Field(description=(
        '"constraint" when a stop or withhold rule triggered; "supplied" for a scored response.'))
    usage: Usage
    judgment: JudgmentSummary
    trace: Trace = Field(None, description="Left out when the request set include_trace to false.")


class Erasure(BaseModel):
    erased_at: datetime
    erased_by: str
    reason: str


class JudgmentRecordResponse(GenerateResponse):
    """A stored judgment with everything the request sent and how it ran."""

    text: str = Field(description="The output as generated, also when it was withheld from the client.")
    finish_reason: str | None = Field(description="Also cancelled or error; null while a stream is in progress.")
    request_id: str
    completed_at: datetime | None = Field(description="Null while a stream is in progress.")
    status: Literal["started", "completed", "cancelled", "failed"] = Field(description=(
        "started: a stream in progress, or one whose final commit failed; cancelled: the client disconnected."))
    input: dict = Field(description='{"prompt": ...} or {"messages": [...]} as sent.')
    parameters: dict
    metadata: dict[str, str]
    latency_ms: float | None
    erasure: Erasure = Field(None, description="Present when the payload was erased: who, when and why.")


class JudgmentListItem(BaseModel):
    id: str
    kind: str
    status: str
    created_at: datetime
    model: str
    heads: str
    text: str
    finish_reason: str | None
    flagged: bool
    usage: Usage
    judgment: JudgmentSummary
    metadata: dict[str, str]


# Field names that the `fields` parameter of GET /v1/judgments accepts.
LIST_ITEM_FIELDS = tuple(JudgmentListItem.model_fields)


class JudgmentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JudgmentListItem]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class DailyStatItem(BaseModel):
    day: date = Field(description="UTC calendar day of the judgments' created_at.")
    constraint: str
    judgments: int = Field(description="Judgments of that day with a verdict of this constraint.")
    passed: int = Field(description="How many of those verdicts passed.")
    pass_rate: float = Field(description="passed / judgments.")


class DailyStatList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DailyStatItem] = Field(description="Oldest day first, then constraints by name.")
