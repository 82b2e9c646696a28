"""Records of judgments and the store that saves and queries them."""

from __future__ import annotations

import base64
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from server.store import integrity
from server.store import queries
from server.store.queries import DailyStat
from server.store.tables import Judgment, Trace, Verdict

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Layout version of the trace dict, stored with each trace row.
TRACE_FORMAT_VERSION = 1

# A streamed judgment is stored with STARTED_STATUS before its first token and
# later gets one of FINAL_STATUSES. A one-shot judgment is saved final.
STARTED_STATUS = "started"
FINAL_STATUSES = ("completed", "cancelled", "failed")
JUDGMENT_STATUSES = (STARTED_STATUS, *FINAL_STATUSES)
# Orders of a listing or export, by id and so by creation time.
JUDGMENT_ORDERS = ("newest", "oldest")


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


@dataclass
class JudgmentQuery:
    """Filters and order for listing judgments. A None field, or an empty ``metadata``, does not filter.

    ``since`` is inclusive and ``until`` exclusive, both on ``created_at``.
    ``min_score``, ``max_score`` and ``passed`` apply to the verdict of
    ``constraint`` and need it set. The score bounds are inclusive and compare
    the final score. ``model`` and ``heads`` match the stored names exactly,
    every ``metadata`` pair must be stored with the judgment, and ``text`` is a
    case-insensitive substring of the output or of the prompt's JSON text.
    """

    since: datetime | None = None
    until: datetime | None = None
    constraint: str | None = None
    min_score: float | None = None
    max_score: float | None = None
    passed: bool | None = None
    flagged: bool | None = None
    kind: str | None = None
    status: str | None = None
    model: str | None = None
    heads: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    # "newest" or "oldest" first.
    order: str = "newest"
    # Only this tenant's judgments; None reads every tenant (the CLI, which has database access anyway).
    tenant: str | None = None

    def __post_init__(self) -> None:
        _require_aware(self.since, "since")
        _require_aware(self.until, "until")
        if self.order not in JUDGMENT_ORDERS:
            raise ValueError(f"order={self.order!r} is not an order. Use one of {_quoted(JUDGMENT_ORDERS)}.")
        if self.status is not None and self.status not in JUDGMENT_STATUSES:
            raise ValueError(
                f"status={self.status!r} is not a judgment status. Use one of {_quoted(JUDGMENT_STATUSES)}."
            )
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
        """Insert a finished one-shot judgment, its verdicts and its trace in one transaction.

        Raises ValueError, before touching the database, for a naive datetime,
        a missing completed_at or a status other than "completed", "cancelled"
        or "failed". Raises StoreUnavailableError if the insert or the commit
        fails, for example on a duplicate id. Nothing of the record is stored then.
        """
        _require_final(record, "save")

        def work(session: Session) -> None:
            session.add(_to_row(record))
            session.flush()
            integrity.append_leaf(session, record)

        self._run(f"save judgment {record.id}", work)
        logger.debug("saved judgment %s with %d verdicts", record.id, len(record.verdicts))

    def start(self, record: JudgmentRecord) -> None:
        """Insert a streamed judgment with status "started", before its first token is sent.

        The record has no verdicts, no trace, and None for completed_at,
        finish_reason and latency_ms. Complete it with finish(). Raises
        ValueError for any other record, before touching the database, and
        StoreUnavailableError if the insert or the commit fails.
        """
        _require_started(record)

        self._run(f"start judgment {record.id}", lambda session: session.add(_to_row(record)))
        logger.debug("started judgment %s", record.id)

    def finish(self, record: JudgmentRecord) -> None:
        """Update a started judgment from every field of ``record``, and insert its verdicts and trace.

        All of it happens in one transaction. The status of ``record`` must be
        "completed", "cancelled" or "failed", with completed_at set, or
        ValueError is raised before touching the database. Raises
        JudgmentStateError if no judgment has the id or its stored status is
        not "started", so a judgment is finished only once. Raises
        StoreUnavailableError if a statement or the commit fails, and the
        stored judgment then stays "started".
        """
        _require_final(record, "finish")
        values = {name: getattr(record, name) for name in _JUDGMENT_FIELDS if name != "id"}
        values["metadata_"] = record.metadata
        # The status condition makes the check and the update one statement, so
        # of two concurrent finish() calls only one updates the row.
        statement = (
            update(Judgment)
            .where(Judgment.id == record.id, Judgment.status == STARTED_STATUS)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

        def work(session: Session) -> None:
            if session.execute(statement).rowcount != 1:
                stored_status = session.scalar(select(Judgment.status).where(Judgment.id == record.id))
                raise JudgmentStateError(record.id, stored_status)
            session.add_all(_verdict_rows(record))
            if record.trace is not None:
                session.add(_trace_row(record))
            session.flush()
            integrity.append_leaf(session, record)

        self._run(f"finish judgment {record.id}", work)
        logger.debug("finished judgment %s as %s with %d verdicts", record.id, record.status, len(record.verdicts))

    def get(self, judgment_id: str, tenant: str | None = None) -> JudgmentRecord | None:
        """Return the judgment with its trace, or None if no judgment has that id (in ``tenant``, when given).

        Verdicts come back sorted by constraint name.
        """
        statement = (
            select(Judgment)
            .where(Judgment.id == judgment_id)
            .options(selectinload(Judgment.verdicts), selectinload(Judgment.trace))
        )
        if tenant is not None:
            statement = statement.where(Judgment.tenant == tenant)
        def work(session: Session) -> JudgmentRecord | None:
            row = session.scalars(statement).one_or_none()
            return None if row is None else _to_record(row, with_trace=True)

        return self._run(f"read judgment {judgment_id}", work)

    def list(self, query: JudgmentQuery, limit: int, cursor: str | None) -> JudgmentPage:
        """Return up to ``limit`` judgments that match ``query``, in its order (newest first by default).

        Items have their verdicts but no trace. Pass the returned
        ``next_cursor``, with the same query, to get the next page. Raises
        InvalidCursorError for a cursor that this store did not return.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        after_id = None if cursor is None else _decode_cursor(cursor)

        # Fetching one row more than limit shows whether another page follows.
        statement = queries.select_page(query, after_id, limit + 1)
        records = self._run("list judgments", lambda session: _read_records(session, statement, with_trace=False))
        items = records[:limit]
        next_cursor = _encode_cursor(items[-1].id) if len(records) > limit else None
        return JudgmentPage(items=items, next_cursor=next_cursor)

    def export(self, query: JudgmentQuery, batch_size: int = 500, with_trace: bool = False) -> Iterator[JudgmentRecord]:
        """Yield every judgment that matches ``query``, in its order, reading ``batch_size`` at a time.

        Each batch is read in a transaction of its own, and no transaction is
        open while the caller consumes a batch. Paging continues after the last
        id of each batch, so a judgment committed during the export appears if
        its id sorts after that point. Records have a trace only ``with_trace``.
        Raises StoreUnavailableError when a batch cannot be read.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")

        after_id = None
        while True:
            statement = queries.select_page(query, after_id, batch_size, with_trace)
            batch = self._run("export judgments", lambda session: _read_records(session, statement, with_trace))
            yield from batch
            if len(batch) < batch_size:
                return
            after_id = batch[-1].id

    def daily_stats(self, query: JudgmentQuery) -> list[DailyStat]:
        """Count per UTC day and constraint the matching judgments and their passed verdicts, oldest day first."""
        statement = queries.select_daily_stats(query)
        rows = self._run("count judgments per day", lambda session: session.execute(statement).all())
        return [DailyStat(row.day, row.constraint, row.judgments, row.passed) for row in rows]

    def _run(self, action: str, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one transaction; when the connection is lost on the way, run it once more.

        A lost connection rolls the transaction back, so the second run starts
        from the same state. A second loss, or any other database error, is
        logged and raised as StoreUnavailableError.
        """
        try:
            try:
                return self._in_transaction(work)
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
                logger.warning("Lost the database connection while trying to %s; retrying once", action)
            return self._in_transaction(work)
        except SQLAlchemyError as exc:
            logger.exception("audit store failed to %s", action)
            raise StoreUnavailableError(f"The audit store could not {action}: {_describe(exc)}") from exc

    def _in_transaction(self, work: Callable[[Session], T]) -> T:
        with Session(self._engine) as session, session.begin():
            return work(session)


@contextmanager
def store_transaction(engine: Engine, action: str) -> Iterator[Session]:
    """Open a session in a transaction that commits on exit, and map database errors.

    A SQLAlchemyError, raised in the block or by the commit, is logged and
    raised as StoreUnavailableError. Other exceptions roll back and pass through.
    """
    try:
        with Session(engine) as session, session.begin():
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
    row.verdicts = _verdict_rows(record)
    if record.trace is not None:
        row.trace = _trace_row(record)
    return row


def _verdict_rows(record: JudgmentRecord) -> list[Verdict]:
    return [
        Verdict(judgment_id=record.id, **{name: getattr(verdict, name) for name in _VERDICT_FIELDS})
        for verdict in record.verdicts
    ]


def _trace_row(record: JudgmentRecord) -> Trace:
    return Trace(judgment_id=record.id, format_version=TRACE_FORMAT_VERSION, data=record.trace)


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


def _read_records(session: Session, statement: Select, with_trace: bool) -> list[JudgmentRecord]:
    return [_to_record(row, with_trace) for row in session.scalars(statement)]


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


def _require_started(record: JudgmentRecord) -> None:
    """Raise ValueError unless ``record`` is a judgment that start() can insert."""
    if record.status != STARTED_STATUS:
        raise ValueError(
            f"start() takes a record with status {STARTED_STATUS!r}, got {record.status!r} for judgment "
            f"{record.id}. Save a one-shot judgment with save()."
        )
    if record.verdicts or record.trace is not None:
        raise ValueError(
            f"start() takes a record without verdicts and trace, got {len(record.verdicts)} verdicts and "
            f"{'a' if record.trace is not None else 'no'} trace for judgment {record.id}. Pass them to finish()."
        )
    for name in ("completed_at", "finish_reason", "latency_ms"):
        value = getattr(record, name)
        if value is not None:
            raise ValueError(
                f"start() takes a record with {name}=None, got {value!r} for judgment {record.id}. "
                "Set it in the record passed to finish()."
            )
    _require_aware(record.created_at, "created_at")


def _require_final(record: JudgmentRecord, method: str) -> None:
    """Raise ValueError unless ``record`` is a finished judgment that ``method`` can store."""
    if record.status not in FINAL_STATUSES:
        raise ValueError(
            f"{method}() takes a record whose status is one of {_quoted(FINAL_STATUSES)}, got {record.status!r} "
            f"for judgment {record.id}. Store a streamed judgment with start() before its first token."
        )
    if record.completed_at is None:
        raise ValueError(
            f"{method}() takes a record with completed_at set, got None for judgment {record.id}. "
            "Set it to the time the judgment finished."
        )
    _require_aware(record.created_at, "created_at")
    _require_aware(record.completed_at, "completed_at")


def _quoted(values: tuple[str, ...]) -> str:
    return ", ".join(repr(value) for value in values)


def _require_aware(value: datetime | None, name: str) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(f"{name}={value.isoformat()} is a naive datetime. Pass a timezone-aware one, such as UTC.")


def _describe(exc: SQLAlchemyError) -> str:
    """Return the driver's error message, which leaves out the SQL statement and its parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    first_line = str(exc).partition("\n")[0]
    return f"{type(exc).__name__}: {first_line}"
