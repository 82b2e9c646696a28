"""Conversions between generation results, stored records and response bodies.

The response to a generation and a later read of the same judgment are both
rendered from the stored record, so the two carry the identical trace.
"""

from __future__ import annotations

from datetime import datetime, timezone

from models.decode import ConstraintModel, TokenTrace
from models.judgment import Judgment
from server.schemas import PromptInput
from server.store import JudgmentRecord, VerdictRecord
from server.worker import GenerationResult


def trace_token_dict(trace: TokenTrace) -> dict:
    return {"position": trace.position, "token_id": trace.token_id, "text": trace.text, "logprob": trace.logprob,
            "scores": trace.scores,
            "attention": {c: [[position, weight] for position, weight in pairs] for c, pairs in trace.attention.items()}}


def request_input(body: PromptInput) -> dict:
    """Return the model input as sent: {"prompt": ...} or {"messages": [...]}."""
    if body.prompt is not None:
        return {"prompt": body.prompt}
    return {"messages": [message.model_dump() for message in body.messages]}


def build_record(judgment_id: str, request_id: str, created_at: datetime, body: PromptInput, parameters: dict,
                 result: GenerationResult, judgment: Judgment, model: ConstraintModel, heads_fingerprint: str,
                 kind: str, output: str) -> JudgmentRecord:
    """Assemble everything about one finished generation or scoring into the record to commit."""
    completed_at = datetime.now(timezone.utc)
    heads_config = model.heads.config
    trace = {"constraints": list(heads_config.constraints),
             "prompt_tokens": [trace_token_dict(t) for t in result.prompt_trace],
             "output_tokens": [trace_token_dict(t) for t in result.output_trace]}
    verdicts = [VerdictRecord(v.constraint, v.score, v.min_score, v.min_position, v.threshold, v.passed)
                for v in judgment.verdicts]
    return JudgmentRecord(
        id=judgment_id, created_at=created_at, completed_at=completed_at, request_id=request_id,
        model_name=model.base.name, model_fingerprint=model.base.fingerprint,
        heads_name=heads_config.name, heads_fingerprint=heads_fingerprint,
        prompt=request_input(body), output=output,
        parameters=parameters | {"top_k_attention": model.top_k_attention}, finish_reason=result.finish_reason,
        status="completed", prompt_tokens=len(result.prompt_trace), completion_tokens=len(result.output_trace),
        latency_ms=round((completed_at - created_at).total_seconds() * 1000, 3), flagged=judgment.flagged,
        metadata=body.metadata or {}, verdicts=verdicts, trace=trace, kind=kind)


def _judgment_summary(record: JudgmentRecord, order: list[str] | None) -> dict:
    verdicts = {v.constraint: v for v in record.verdicts}
    names = [name for name in (order or []) if name in verdicts] + sorted(set(verdicts) - set(order or []))
    return {"flagged": record.flagged,
            "constraints": {name: {"score": verdicts[name].score, "min_score": verdicts[name].min_score,
                                   "min_position": verdicts[name].min_position,
                                   "threshold": verdicts[name].threshold, "passed": verdicts[name].passed}
                            for name in names}}


def _usage(record: JudgmentRecord) -> dict:
    return {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens}


def generation_body(record: JudgmentRecord) -> dict:
    """Render the response to a generation request."""
    return {"id": record.id, "object": "judgment", "created_at": record.created_at.isoformat(),
            "model": record.model_name, "heads": record.heads_name, "kind": record.kind, "text": record.output,
            "finish_reason": record.finish_reason, "usage": _usage(record),
            "judgment": _judgment_summary(record, record.trace["constraints"]), "trace": record.trace}


def record_body(record: JudgmentRecord) -> dict:
    """Render a stored judgment in full."""
    return generation_body(record) | {
        "request_id": record.request_id, "completed_at": record.completed_at.isoformat(), "status": record.status,
        "input": record.prompt, "parameters": record.parameters, "metadata": record.metadata,
        "latency_ms": record.latency_ms, "model_fingerprint": record.model_fingerprint,
        "heads_fingerprint": record.heads_fingerprint}


def list_item_body(record: JudgmentRecord, constraint_order: list[str]) -> dict:
    return {"id": record.id, "kind": record.kind, "created_at": record.created_at.isoformat(), "model": record.model_name,
            "heads": record.heads_name, "text": record.output, "finish_reason": record.finish_reason,
            "flagged": record.flagged, "usage": _usage(record),
            "judgment": _judgment_summary(record, constraint_order), "metadata": record.metadata}
