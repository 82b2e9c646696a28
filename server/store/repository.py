"""The store that saves judgments and queries them."""

from __future__ import annotations

import base64
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Engine, Select, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from server.store import queries
from server.store.group_commit import GroupCommitter
from server.store.queries import DailyStat
from server.store.records import (
    FINAL_STATUSES,
    JUDGMENT_FIELDS,
    JUDGMENT_STATUSES,
    STARTED_STATUS,
    VERDICT_FIELDS,
    JudgmentRecord,
    StoreUnavailableError,
    VerdictRecord,
)
from server.store.tables import Judgment
from server.store.writes import PreparedWrite, prepare_write, write_group

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Orders of a listing or export, by id and so by creation time.
JUDGMENT_ORDERS = ("newest", "oldest")
# The maximum number of writes that one transaction commits. Writes that
# arrive while a group commits form the next group. The server calls the store
# from AnyIO's thread pool, which runs at most 40 calls at once by default, so
# groups rarely reach this bound. It limits how many writes a failed group
# commits again one at a time.
DEFAULT_MAX_GROUP_SIZE = 64


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
    """Saves judgments with their verdicts and traces, and reads them back.

    Writes from concurrent threads are committed in groups: one transaction,
    and so one fsync, for every write that waits while the previous group
    commits. Each write still returns only once it is committed, and raises
    only its own error. ``max_group_size`` bounds the writes in one transaction.
    """

    def __init__(self, engine: Engine, max_group_size: int = DEFAULT_MAX_GROUP_SIZE) -> None:
        self._engine = engine
        self._writes: GroupCommitter[PreparedWrite] = GroupCommitter(self._commit_group, max_group_size)

    def save(self, record: JudgmentRecord) -> None:
        """Insert a finished one-shot judgment, its verdicts and its trace in one transaction.

        The transaction may also commit other threads' writes, and returns once
        it has committed. Raises ValueError, before touching the database, for
        a naive datetime, a missing completed_at, a status other than
        "completed", "cancelled" or "failed", or a NaN or infinite number in a
        JSON field. Raises StoreUnavailableError if the insert or the commit
        fails, for example on a duplicate id. Nothing of the record is stored then.
        """
        _require_final(record, "save")

        self._writes.submit(_prepare(record, "save"))
        logger.debug("saved judgment %s with %d verdicts", record.id, len(record.verdicts))

    def start(self, record: JudgmentRecord) -> None:
        """Insert a streamed judgment with status "started", before its first token is sent.

        The record has no verdicts, no trace, and None for completed_at,
        finish_reason and latency_ms. Complete it with finish(). Raises
        ValueError for any other record, before touching the database, and
        StoreUnavailableError if the insert or the commit fails.
        """
        _require_started(record)

        self._writes.submit(_prepare(record, "start"))
        logger.debug("started judgment %s", record.id)

    def finish(self, record: JudgmentRecord) -> None:
        """Update a started judgment from every field of ``record``, and insert its verdicts and trace.

        All of it happens in one transaction, which may also commit other
        threads' writes. The status of ``record`` must be "completed",
        "cancelled" or "failed", with completed_at set, and its JSON fields
        free of NaN and infinity, or ValueError is raised before touching the
        database. Raises JudgmentStateError if no judgment has the id or its
        stored status is not "started", so a judgment is finished only once.
        Raises StoreUnavailableError if a statement or the commit fails, and
        the stored judgment then stays "started".
        """
        _require_final(record, "finish")

        self._writes.submit(_prepare(record, "finish"))
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

    def _commit_group(self, group: list[PreparedWrite]) -> list[Exception | None]:
        """Commit ``group`` in one transaction. When that fails, commit each write alone, so only its own fails."""
        if len(group) > 1:
            try:
                self._in_transaction(lambda session: write_group(session.connection(), group))
            except Exception as exc:  # the one-by-one commits below find the failing write and raise its error
                logger.warning("A group of %d judgment writes failed (%s), so each is committed alone: %s",
                               len(group), _describe(exc), ", ".join(write.judgment_id for write in group))
            else:
                return [None] * len(group)
        return [self._commit_alone(write) for write in group]

    def _commit_alone(self, write: PreparedWrite) -> Exception | None:
        """Commit one write, and return the exception for its caller to raise, or None."""
        try:
            self._run(write.action, lambda session: write_group(session.connection(), [write]))
        except Exception as exc:  # raised in the caller's thread by GroupCommitter.submit
            return exc
        return None


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


def _prepare(record: JudgmentRecord, method: str) -> PreparedWrite:
    """Prepare the write; a value that JSON cannot represent fails as the insert of it would."""
    try:
        return prepare_write(record, method)
    except TypeError as exc:
        logger.exception("audit store failed to %s judgment %s", method, record.id)
        raise StoreUnavailableError(f"The audit store could not {method} judgment {record.id}: "
                                    f"{_describe(exc)}") from exc


def _to_record(row: Judgment, with_trace: bool) -> JudgmentRecord:
    """Copy a loaded row into a record. Without ``with_trace`` the trace is not touched, so it is never loaded."""
    trace = row.trace.data if with_trace and row.trace is not None else None
    verdicts = [VerdictRecord(**{name: getattr(verdict, name) for name in VERDICT_FIELDS}) for verdict in row.verdicts]
    return JudgmentRecord(
        **{name: getattr(row, name) for name in JUDGMENT_FIELDS},
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


def _describe(exc: Exception) -> str:
    """Return the driver's error message, which leaves out the SQL statement and its parameters."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f"{type(exc.orig).__name__}: {exc.orig}"
    first_line = str(exc).partition("\n")[0]
    return f"{type(exc).__name__}: {first_line}"
