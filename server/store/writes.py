"""Judgment writes: rows encoded and leaves hashed before the transaction, then inserted a group at a time.

A write is prepared in its caller's thread, so the JSON encoding and hashing
of one judgment overlap another group's commit. ``write_group`` then runs a
fixed number of statements for the whole group, each an executemany.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Connection, Dialect, bindparam, insert, select, update
from sqlalchemy.types import TypeDecorator

from server.store import integrity
from server.store.records import (
    JUDGMENT_FIELDS,
    STARTED_STATUS,
    TRACE_FORMAT_VERSION,
    VERDICT_FIELDS,
    JudgmentRecord,
    JudgmentStateError,
)
from server.store.tables import Judgment, Trace, Verdict

WRITE_METHODS = ("save", "start", "finish")


class EncodedJSON(TypeDecorator[str]):
    """A JSON column bound from text that is JSON already, so that it is not serialised a second time."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None


class FinishConflictError(RuntimeError):
    """A group's finish found its judgment not started; the group is committed again one write at a time."""


@dataclass
class PreparedWrite:
    """The rows that one save(), start() or finish() writes, and the leaf it appends."""

    # Description for logs and errors, such as "save judgment <id>".
    action: str
    judgment_id: str
    # The row to insert (save, start), or the values that update a started row (finish).
    inserted: dict[str, Any] | None
    finished: dict[str, Any] | None
    verdicts: list[dict[str, Any]]
    trace: dict[str, Any] | None
    # None for start(): a judgment gets its leaf when it is final.
    leaf: integrity.NewLeaf | None


def prepare_write(record: JudgmentRecord, method: str) -> PreparedWrite:
    """Encode the rows that ``method`` ("save", "start" or "finish") writes for ``record``, and hash its leaf.

    Raises ValueError for a value that canonical JSON rejects (NaN or
    infinity), and TypeError for one that JSON cannot represent at all.
    """
    if method not in WRITE_METHODS:
        raise ValueError(f"method={method!r} is not a write. Use one of {WRITE_METHODS}.")
    values = {name: getattr(record, name) for name in JUDGMENT_FIELDS} | {"metadata": record.metadata}
    if method == "start":
        return PreparedWrite(f"start judgment {record.id}", record.id, values, None, [], None, None)

    # The canonical text is both the stored trace and what the payload hash covers, so it is encoded once.
    trace_json = None if record.trace is None else integrity.canonical_text(record.trace)
    leaf = integrity.new_leaf(record, trace_json)
    verdicts = [{"judgment_id": record.id} | {name: getattr(verdict, name) for name in VERDICT_FIELDS}
                for verdict in record.verdicts]
    trace = None if trace_json is None else {
        "judgment_id": record.id, "format_version": TRACE_FORMAT_VERSION, "data": trace_json}
    if method == "save":
        return PreparedWrite(f"save judgment {record.id}", record.id, values, None, verdicts, trace, leaf)
    finished = {name: value for name, value in values.items() if name != "id"} | {"finished_id": record.id}
    return PreparedWrite(f"finish judgment {record.id}", record.id, None, finished, verdicts, trace, leaf)


_INSERT_JUDGMENTS = insert(Judgment.__table__)
# The status condition makes the check and the update one statement, so of two
# concurrent finishes of one judgment only one updates the row. The SET clause
# comes from the keys of the parameters.
_FINISH_JUDGMENTS = update(Judgment.__table__).where(
    Judgment.__table__.c.id == bindparam("finished_id"), Judgment.__table__.c.status == STARTED_STATUS)
_INSERT_VERDICTS = insert(Verdict.__table__)
_INSERT_TRACES = insert(Trace.__table__).values(
    judgment_id=bindparam("judgment_id"), format_version=bindparam("format_version"),
    data=bindparam("data", type_=EncodedJSON()))


def write_group(connection: Connection, writes: list[PreparedWrite]) -> None:
    """Write the rows of ``writes`` and append their leaves in order, in the connection's transaction.

    Raises JudgmentStateError when the group is one finish whose judgment is
    not started, and FinishConflictError when a larger group has such a finish.
    """
    inserted = [write.inserted for write in writes if write.inserted is not None]
    if inserted:
        connection.execute(_INSERT_JUDGMENTS, inserted)
    _finish_started(connection, [write.finished for write in writes if write.finished is not None])

    verdicts = [row for write in writes for row in write.verdicts]
    if verdicts:
        connection.execute(_INSERT_VERDICTS, verdicts)
    traces = [write.trace for write in writes if write.trace is not None]
    if traces:
        connection.execute(_INSERT_TRACES, traces)
    leaves = [write.leaf for write in writes if write.leaf is not None]
    if leaves:
        integrity.append_leaves(connection, leaves)


def _finish_started(connection: Connection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # Updating in id order makes two groups that finish the same judgments lock them in one order.
    rows = sorted(rows, key=lambda row: row["finished_id"])
    updated = connection.execute(_FINISH_JUDGMENTS, rows).rowcount
    if updated == len(rows):
        return
    if len(rows) > 1:
        raise FinishConflictError(f"{len(rows) - updated} of the {len(rows)} judgments this group finishes are "
                                  "not started")
    judgment_id = rows[0]["finished_id"]
    raise JudgmentStateError(judgment_id, connection.scalar(select(Judgment.status).where(Judgment.id == judgment_id)))
