"""Records of judgments and the store that saves and queries them."""

from __future__ import annotations

import base64
import logging
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from server.store.tables import Judgment, Trace, Verdict

logger = logging.getLogger(__name__)

# Layout version of the trace dict, stored with each trace row.
TRACE_FORMAT_VERSION = 1


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

    Datetimes must be timezone-aware. The store returns them in UTC.
    """

    id: str
    created_at: datetime
    completed_at: datetime
    request_id: str
    model_name: str
    model_fingerprint: str
    heads_name: str
    heads_fingerprint: str
    # {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}
    prompt: dict[str, Any]
    output: str
    parameters: dict[str, Any]
    finish_reason: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    flagged: bool
    metadata: dict[str, str]
    verdicts: list[VerdictRecord]
    # None in list results, and for a judgment saved without a trace.
    trace: dict[str, Any] | None
    # "generation", or "score" for a text that the caller supplied.
    kind: str = "generation"


@dataclass
class JudgmentQuery:
    """Filters for listing judgments. A None field does not filter.

    ``since`` is inclusive and ``until`` exclusive, both on ``created_at``.
    ``min_score``, ``max_score`` and ``passed`` apply to the verdict of
    ``constraint`` and need it set. The score bounds are inclusive and compare
    the final score.
    """

    since: datetime | None = None
    until: datetime | None = None
    constraint: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    passed: bool | None = None
    flagged: bool | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        _require_aware(self.since, "since")
        _require_aware(self.until, "until")
        verdict_filters = {"min_score": self.min_score, "max_score": self.max_score, "passed": self.passed}
        for name, value in verdict_filters.items():
            if value is not None and self.constraint is None:
                raise ValueError(
                    f"{name}={value!r} filters the verdict of one constraint, so constraint must be set too"
                )
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ValueError(f"min_score {self.min_score} is greater than max_score {self.max_score}")


@dataclass
class JudgmentPage:
    """One page of a judgment listing, with the cursor of the next page or None on the last."""

    items: list[JudgmentRecord]
    next_cursor: str | None


class StoreUnavailableError(RuntimeError):
    """The audit database could not be reached, or a read or commit failed."""


class InvalidCursorError(ValueError):
    """A paging cursor that this server did not issue."""


def new_judgment_id() -> str:
    """Return a new UUIDv7 (RFC 9562) in canonical string form.

    The first 48 bits are the Unix time in milliseconds. The 12 bits after the
    version carry the sub-millisecond fraction, which RFC 9562 allows in place
    of random bits. So ids sort by creation time to within about 0.25
    microseconds, unless the system clock steps back. The last 62 bits are random.
    """
    unix_ms, sub_ms_ns = divmod(time.time_ns(), 1_000_000)
    sub_ms_fraction = sub_ms_ns * 4096 // 1_000_000
    value = (
        (unix_ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version
        | sub_ms_fraction << 64
        | 0b10 << 62  # variant
        | secrets.randbits(62)
    )
    return str(uuid.UUID(int=value))


class AuditStore:
    """Saves judgments with their verdicts and traces, and reads them back."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def save(self, record: JudgmentRecord) -> None:
        """Insert the judgment, its verdicts and its trace in one transaction.

        Raises ValueError for a naive datetime, before touching the database.
        Raises StoreUnavailableError if the insert or the commit fails, for
        example on a duplicate id. Nothing of the record is stored then.
        """
        _require_aware(record.created_at, "created_at")
        _require_aware(record.completed_at, "completed_at")

        try:
            with Session(self._engine) as session, session.begin():
                session.add(_to_row(record))
        except SQLAlchemyError as exc:
            logger.exception("failed to save judgment %s", record.id)
            raise StoreUnavailableError(
                f"The audit store could not save judgment {record.id}: {_describe(exc)}"
            ) from exc
        logger.debug("saved judgment %s with %d verdicts", record.id, len(record.verdicts))

    def get(self, judgment_id: str) -> JudgmentRecord | None:
        """Return the judgment with its trace, or None if no judgment has that id.

        Verdicts come back sorted by constraint name.
        """
        statement = (
            select(Judgment)
            .where(Judgment.id == judgment_id)
            .options(selectinload(Judgment.verdicts), selectinload(Judgment.trace))
        )
        with self._read_session(f"read judgment {judgment_id}") as session:
            row = session.scalars(statement).one_or_none()
            return None if row is None else _to_record(row, with_trace=True)

    def list(self, query: JudgmentQuery, limit: int, cursor: str | None) -> JudgmentPage:
        """Return up to ``limit`` judgments that match ``query``, newest first.

        Items have their verdicts but no trace. Pass the returned
        ``next_cursor`` to get the next page. Raises InvalidCursorError for a
        cursor that this store did not return.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")

        statement = select(Judgment).options(selectinload(Judgment.verdicts))
        if query.constraint is not None:
            on_constraint = (Verdict.judgment_id == Judgment.id) & (Verdict.constraint == query.constraint)
            statement = statement.join(Verdict, on_constraint)
        conditions = _conditions(query)
        if cursor is not None:
            conditions.append(Judgment.id < _decode_cursor(cursor))
        statement = statement.where(*conditions).order_by(Judgment.id.desc()).limit(limit + 1)

        # Fetching one row more than limit shows whether another page follows.
        with self._read_session("list judgments") as session:
            rows = session.scalars(statement).all()
            items = [_to_record(row, with_trace=False) for row in rows[:limit]]
        next_cursor = _encode_cursor(items[-1].id) if len(rows) > limit else None
        return JudgmentPage(items=items, next_cursor=next_cursor)

    @contextmanager
    def _read_session(self, action: str) -> Iterator[Session]:
        try:
            with Session(self._engine) as session, session.begin():
                yield session
        except SQLAlchemyError as exc:
            logger.exception("audit store failed to %s", action)
            raise StoreUnavailableError(f"The audit store could not {action}: {_describe(exc)}") from exc


# Columns that JudgmentRecord and the judgments table share under one name.
_JUDGMENT_FIELDS = tuple(
    field.name for field in fields(JudgmentRecord) if field.name not in ("metadata", "verdicts", "trace")
)
_VERDICT_FIELDS = tuple(field.name for field in fields(VerdictRecord))


def _to_row(record: JudgmentRecord) -> Judgment:
    row = Judgment(**{name: getattr(record, name) for name in _JUDGMENT_FIELDS})
    row.metadata_ = record.metadata
    row.verdicts = [
        Verdict(**{name: getattr(verdict, name) for name in _VERDICT_FIELDS}) for verdict in record.verdicts
    ]
    if record.trace is not None:
        row.trace = Trace(format_version=TRACE_FORMAT_VERSION, data=record.trace)
    return row


def _to_record(row: Judgment, with_trace: bool) -> JudgmentRecord:
    """Copy a loaded row into a record. Without ``with_trace`` the trace is not touched, so it is never loaded."""
    trace = row.trace.data if with_trace and row.trace is not None else None
    verdicts = [VerdictRecord(**{name: getattr(verdict, name) for name in _VERDICT_FIELDS}) for verdict in row.verdicts]
    return JudgmentRecord(
        **{name: getattr(row, name) for name in _JUDGMENT_FIELDS},
        metadata=row.metadata_,
        verdicts=verdicts,
        trace=trace,
    )


def _conditions(query: JudgmentQuery) -> list[ColumnElement[bool]]:
    """Build the WHERE conditions of ``query``. Verdict conditions expect verdicts joined on the constraint."""
    conditions: list[ColumnElement[bool]] = []
    if query.since is not None:
        conditions.append(Judgment.created_at >= query.since)
    if query.until is not None:
        conditions.append(Judgment.created_at < query.until)
    if query.flagged is not None:
        conditions.append(Judgment.flagged == query.flagged)
    if query.kind is not None:
        conditions.append(Judgment.kind == query.kind)
    if query.min_score is not None:
        conditions.append(Verdict.score >= query.min_score)
    if query.max_score is not None:
        conditions.append(Verdict.score <= query.max_score)
    if query.passed is not None:
        conditions.append(Verdict.passed == query.passed)
    return conditions


def _encode_cursor(judgment_id: str) -> str:
    return base64.urlsafe_b64encode(judgment_id.encode("ascii")).decode("ascii").rstrip("=")


def _decode_cursor(cursor: str) -> str:
    """Return the judgment id in ``cursor``, or raise InvalidCursorError."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        judgment_id = base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii")
        is_issued = str(uuid.UUID(judgment_id)) == judgment_id and _encode_cursor(judgment_id) == cursor
    except ValueError:  # covers binascii.Error and UnicodeError
        is_issued = False
    if not is_issued:
        raise InvalidCursorError(
            f"Invalid cursor {cursor[:100]!r}: this server did not issue it. Restart paging without a cursor."
        )
    return judgment_id


def _require_aware(value: datetime | None, name: str) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name}={value.isoformat()} is a naive datetime. Pass a timezone-aware one, such as UTC.")


def _describe(exc: SQLAlchemyError) -> str:
    """Return the driver's error message, which leaves out the SQL statement and its parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    first_line = str(exc).partition("\n")[0]
    return f"{type(exc).__name__}: {first_line}"
