"""Records of judgments as the store takes and returns them, and the store's errors."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

# Layout version of the trace dict, stored with each trace row.
TRACE_FORMAT_VERSION = 1

# A streamed judgment is stored with STARTED_STATUS before its first token and
# later gets one of FINAL_STATUSES. A one-shot judgment is saved final.
STARTED_STATUS = "started"
FINAL_STATUSES = ("completed", "cancelled", "failed")
JUDGMENT_STATUSES = (STARTED_STATUS, *FINAL_STATUSES)


@dataclass
class VerdictRecord:
    """The outcome of one constraint for one judgment."""

    constraint: str
    score: float
    min_score: float
    min_position: int
    threshold: float
    passed: bool


@dataclass
class JudgmentRecord:
    """One generation request with its output, verdicts and trace.

    Datetimes must be timezone-aware. The store returns them in UTC. A
    streamed judgment is written to one row in two steps: ``AuditStore.start``
    inserts it with status "started", no output, no verdicts and no trace,
    and ``AuditStore.finish`` updates it to its final status.
    """

    id: str
    created_at: datetime
    # completed_at, finish_reason and latency_ms are None while status is "started".
    completed_at: datetime | None
    request_id: str
    model_name: str
    model_fingerprint: str
    heads_name: str
    heads_fingerprint: str
    # {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}
    prompt: dict[str, Any]
    output: str
    parameters: dict[str, Any]
    finish_reason: str | None
    # "started", then "completed", "cancelled" (the client disconnected, and
    # output has the tokens generated until then) or "failed".
    status: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float | None
    flagged: bool
    metadata: dict[str, str]
    verdicts: list[VerdictRecord]
    # None in list results, and for a judgment saved without a trace.
    trace: dict[str, Any] | None
    # "generation", or "score" for a text that the caller supplied.
    kind: str = "generation"
    # The constraint policy applied to the request and its outcome, as a JSON object.
    policy: dict[str, Any] | None = None
    # The tenant of the caller that made the request; "default" when the server runs without keys.
    tenant: str = "default"


# Columns that JudgmentRecord and the judgments table share under one name.
JUDGMENT_FIELDS = tuple(
    field.name for field in fields(JudgmentRecord) if field.name not in ("metadata", "verdicts", "trace")
)
VERDICT_FIELDS = tuple(field.name for field in fields(VerdictRecord))


class StoreUnavailableError(RuntimeError):
    """The audit database could not be reached, or a read or commit failed."""


class JudgmentStateError(RuntimeError):
    """A finish() of a judgment that was never started or is already finished.

    ``status`` is the stored status, or None if no judgment has the id.
    """

    def __init__(self, judgment_id: str, status: str | None) -> None:
        if status is None:
            reason = "no judgment has that id. Store it with start() before finish()"
        else:
            reason = f"its status is {status!r}, not {STARTED_STATUS!r}, so it was already finished"
        super().__init__(f"Cannot finish judgment {judgment_id}: {reason}.")
        self.judgment_id = judgment_id
        self.status = status
