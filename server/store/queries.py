"""SQL of the auditor queries: filter conditions, keyset paging, and aggregates per day.

The statements run on SQLite and PostgreSQL. The two SQL constructs below
compile to another expression on SQLite. AuditStore runs the statements in its
transactions and turns rows into records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any

from sqlalchemy import Boolean, ColumnElement, Date, Select, String, Text, case, cast, func, literal, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import selectinload
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from server.store.tables import Judgment, Verdict

if TYPE_CHECKING:
    from server.store.repository import JudgmentQuery


@dataclass
class DailyStat:
    """The verdicts of one constraint on one UTC day: how many judgments it judged and how many passed."""

    day: date
    constraint: str
    judgments: int
    passed: int

    @property
    def pass_rate(self) -> float:
        return self.passed / self.judgments


class utc_day(FunctionElement[date]):
    """The UTC calendar day of a UTCDateTime column, which stores naive UTC values.

    Compiles to CAST(... AS DATE), and to date(...) on SQLite.
    """

    type = Date()
    inherit_cache = True


@compiles(utc_day)
def _compile_utc_day(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS DATE)"


@compiles(utc_day, "sqlite")
def _compile_utc_day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite stores the datetime as ISO 8601 text, and date() returns its "YYYY-MM-DD"
    # part, where CAST(... AS DATE) would return the year as a number.
    return f"date({compiler.process(element.clauses, **kw)})"


class json_member_equals(FunctionElement[bool]):
    """True where the JSON object in a column has the string ``value`` under ``key``.

    Takes the column, the key and the value, the last two as bound strings.
    Compiles to PostgreSQL's ``->>`` operator, and to a json_each lookup on SQLite.
    """

    type = Boolean()
    inherit_cache = True


@compiles(json_member_equals)
def _compile_json_member_equals(element: json_member_equals, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"({column} ->> {key}) = {value}"


@compiles(json_member_equals, "sqlite")
def _compile_json_member_equals_sqlite(element: json_member_equals, compiler: SQLCompiler, **kw: Any) -> str:
    # Not JSON_EXTRACT with a '$."key"' path: SQLite 3.40 compares that label with
    # the stored key as written, so a key stored escaped ("\u00e9", or one with a
    # quote) never matches. json_each returns the keys decoded.
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"EXISTS (SELECT 1 FROM json_each({column}) WHERE json_each.key = {key} AND json_each.value = {value})"


def select_page(query: JudgmentQuery, after_id: str | None, limit: int, with_trace: bool = False) -> Select:
    """Select up to ``limit`` judgments that match ``query`` and follow ``after_id`` in the query's order.

    Verdicts are loaded with each judgment, and the trace only ``with_trace``.
    Ids are UUIDv7, so ordering by id orders by creation time, and the last id
    of a page is a stable place to continue from.
    """
    loaders = [selectinload(Judgment.verdicts)]
    if with_trace:
        loaders.append(selectinload(Judgment.trace))
    statement = select(Judgment).options(*loaders)
    if query.constraint is not None:
        on_constraint = (Verdict.judgment_id == Judgment.id) & (Verdict.constraint == query.constraint)
        statement = statement.join(Verdict, on_constraint)

    conditions = judgment_conditions(query)
    oldest_first = query.order == "oldest"
    if after_id is not None:
        conditions.append(Judgment.id > after_id if oldest_first else Judgment.id < after_id)
    order = Judgment.id.asc() if oldest_first else Judgment.id.desc()
    return statement.where(*conditions).order_by(order).limit(limit)


def select_daily_stats(query: JudgmentQuery) -> Select:
    """Count the judgments and passed verdicts per UTC day and constraint, oldest day first.

    Every verdict of a matching judgment counts, or only the verdict of
    ``query.constraint`` when it is set. Judgments without verdicts, such as
    started streams, do not appear. ``query.order`` does not apply.
    """
    day = utc_day(Judgment.created_at).label("day")
    passed = func.sum(case((Verdict.passed, 1), else_=0)).label("passed")
    on_verdict = Verdict.judgment_id == Judgment.id
    if query.constraint is not None:
        on_verdict &= Verdict.constraint == query.constraint
    return (
        select(day, Verdict.constraint, func.count().label("judgments"), passed)
        .select_from(Judgment)
        .join(Verdict, on_verdict)
        .where(*judgment_conditions(query))
        .group_by(day, Verdict.constraint)
        .order_by(day, Verdict.constraint)
    )


def judgment_conditions(query: JudgmentQuery) -> list[ColumnElement[bool]]:
    """Build the WHERE conditions of ``query``. Verdict conditions expect the constraint's verdict joined."""
    conditions: list[ColumnElement[bool]] = []
    if query.tenant is not None:
        conditions.append(Judgment.tenant == query.tenant)
    if query.since is not None:
        conditions.append(Judgment.created_at >= query.since)
    if query.until is not None:
        conditions.append(Judgment.created_at < query.until)
    if query.flagged is not None:
        conditions.append(Judgment.flagged == query.flagged)
    for column, value in ((Judgment.kind, query.kind), (Judgment.status, query.status),
                          (Judgment.model_name, query.model), (Judgment.heads_name, query.heads)):
        if value is not None:
            conditions.append(column == value)
    for key, value in query.metadata.items():
        conditions.append(json_member_equals(Judgment.metadata_, literal(key, String()), literal(value, String())))
    if query.text is not None:
        conditions.append(_text_condition(query.text))
    if query.min_score is not None:
        conditions.append(Verdict.score >= query.min_score)
    if query.max_score is not None:
        conditions.append(Verdict.score <= query.max_score)
    if query.passed is not None:
        conditions.append(Verdict.passed == query.passed)
    return conditions


def _text_condition(text: str) -> ColumnElement[bool]:
    """Match ``text`` as a case-insensitive substring of the output or of the prompt's JSON text.

    The prompt column contains JSON as json.dumps writes it, so quotes, backslashes
    and non-ASCII characters appear escaped there, and the search text is escaped
    the same way. Key names ("messages", "role", "content") are part of that text too.
    """
    # NOTE: non-ASCII letters match case-sensitively in prompts, where they are
    # escaped ("\u00e9"), and in outputs on SQLite, whose lower() folds ASCII only.
    prompt_text = json.dumps(text)[1:-1]
    return or_(
        Judgment.output.icontains(text, autoescape=True),
        cast(Judgment.prompt, Text).icontains(prompt_text, autoescape=True),
    )
