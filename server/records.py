"""Response bodies rendered from stored records.

The response to a generation and a later read of the same judgment are both
rendered from the record that was committed, so the two carry the identical
trace. Responses hide a withheld text (and its tokens); reads of the record,
which are for auditors, show it.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from server.store import JudgmentRecord
from server.store.queries import DailyStat


def timestamp(value: datetime) -> str:
    """Format a UTC time as ISO 8601 with a Z, as the response models serialize it too."""
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def is_withheld(record: JudgmentRecord) -> bool:
    return bool(record.policy and record.policy.get("withheld"))


def redact_token(token: dict) -> dict:
    """Return a trace token without what would reveal the withheld text: its id, text and logprobs."""
    return {key: value for key, value in token.items() if key != "top_logprobs"} | {
        "token_id": None, "text": None, "logprob": None}


def response_trace(record: JudgmentRecord) -> dict:
    """Return the record's trace as a response shows it, with output tokens redacted when the text was withheld."""
    if not is_withheld(record):
        return record.trace
    return record.trace | {"output_tokens": [redact_token(token) for token in record.trace["output_tokens"]]}


def judgment_summary(record: JudgmentRecord, order: list[str] | None) -> dict:
    verdicts = {v.constraint: v for v in record.verdicts}
    names = [name for name in (order or []) if name in verdicts] + sorted(set(verdicts) - set(order or []))
    return {"flagged": record.flagged,
            "constraints": {name: {"score": verdicts[name].score, "min_score": verdicts[name].min_score,
                                   "min_position": verdicts[name].min_position,
                                   "threshold": verdicts[name].threshold, "passed": verdicts[name].passed}
                            for name in names},
            "policy": record.policy}


def usage(record: JudgmentRecord) -> dict:
    return {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
            "total_tokens": record.prompt_tokens + record.completion_tokens}


def identity(record: JudgmentRecord) -> dict:
    """Return which model, heads and seed produced a judgment: what a replay needs."""
    return {"model": record.model_name, "model_fingerprint": record.model_fingerprint, "heads": record.heads_name,
            "heads_fingerprint": record.heads_fingerprint, "seed": record.parameters.get("seed")}


def generation_body(record: JudgmentRecord, include_trace: bool = True) -> dict:
    """Render the response to a generation or score request."""
    body = {"id": record.id, "object": "judgment", "created_at": timestamp(record.created_at)} | identity(record) | {
        "kind": record.kind, "text": None if is_withheld(record) else record.output,
        "finish_reason": record.finish_reason, "usage": usage(record),
        "judgment": judgment_summary(record, (record.trace or {}).get("constraints"))}
    if include_trace:
        body["trace"] = response_trace(record)
    return body


def record_body(record: JudgmentRecord) -> dict:
    """Render a stored judgment in full, the text included even when it was withheld from the client."""
    body = generation_body(record, include_trace=record.trace is not None) | {
        "text": record.output, "request_id": record.request_id, "status": record.status,
        "completed_at": timestamp(record.completed_at) if record.completed_at else None,
        "input": record.prompt, "parameters": record.parameters, "metadata": record.metadata,
        "latency_ms": record.latency_ms}
    if record.trace is not None:
        body["trace"] = record.trace
    return body


def list_item_body(record: JudgmentRecord, constraint_order: list[str]) -> dict:
    return {"id": record.id, "kind": record.kind, "status": record.status, "created_at": timestamp(record.created_at),
            "model": record.model_name, "heads": record.heads_name, "text": record.output,
            "finish_reason": record.finish_reason, "flagged": record.flagged, "usage": usage(record),
            "judgment": judgment_summary(record, constraint_order), "metadata": record.metadata}


def daily_stat_body(stat: DailyStat) -> dict:
    return {"day": stat.day.isoformat(), "constraint": stat.constraint, "judgments": stat.judgments,
            "passed": stat.passed, "pass_rate": stat.pass_rate}


def sse_event(data: dict | str, event: str | None = None) -> str:
    """Format one server-sent event; ``data`` is sent as JSON unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
