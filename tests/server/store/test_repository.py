import dataclasses
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, create_engine, delete, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from server.store import (
    AuditStore,
    InvalidCursorError,
    JudgmentQuery,
    JudgmentRecord,
    JudgmentStateError,
    StoreUnavailableError,
    VerdictRecord,
    create_engine_for,
    new_judgment_id,
    upgrade_database,
)
import server.store.db as db_module
from server.store.db import _set_postgresql_compression
from server.store.records import TRACE_FORMAT_VERSION
from server.store.repository import _encode_cursor
from server.store.tables import Judgment, Trace, Verdict

BASE_TIME = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def engine(engine: Engine) -> Engine:
    """The shared empty engine of each backend (see conftest.py), upgraded to the newest revision."""
    upgrade_database(engine)
    return engine


@pytest.fixture
def store(engine) -> AuditStore:
    return AuditStore(engine)


def make_record(
    created_at: datetime = BASE_TIME,
    flagged: bool = False,
    scores: dict[str, float] | None = None,
    threshold: float = 0.5,
) -> JudgmentRecord:
    """Build a judgment with one verdict per entry of ``scores``, sorted by constraint name."""
    scores = {"decidability": 0.9, "testifiability": 0.8} if scores is None else scores
    verdicts = [
        VerdictRecord(
            constraint=name,
            score=score,
            min_score=score / 2,
            min_position=7,
            threshold=threshold,
            passed=score >= threshold,
        )
        for name, score in sorted(scores.items())
    ]
    return JudgmentRecord(
        id=new_judgment_id(),
        created_at=created_at,
        completed_at=created_at + timedelta(milliseconds=250),
        request_id=f"req-{uuid.uuid4()}",
        model_name="SmolLM2-135M-Instruct",
        model_fingerprint="a" * 64,
        heads_name="default-heads",
        heads_fingerprint="b" * 64,
        prompt={"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        output="The capital of France is Paris.",
        parameters={"max_new_tokens": 32, "temperature": 0.0},
        finish_reason="stop",
        status="completed",
        prompt_tokens=12,
        completion_tokens=8,
        latency_ms=250.5,
        flagged=flagged,
        metadata={"tenant": "acme"},
        verdicts=verdicts,
        trace={"tokens": [{"id": 504, "text": "The", "logprob": -0.1, "scores": {"decidability": 0.9}}]},
    )


def make_started(record: JudgmentRecord) -> JudgmentRecord:
    """Return ``record`` as start() takes it: no output, verdicts, trace or completion fields yet."""
    return dataclasses.replace(
        record,
        status="started",
        completed_at=None,
        finish_reason=None,
        latency_ms=None,
        output="",
        completion_tokens=0,
        flagged=False,
        verdicts=[],
        trace=None,
    )


def count_rows(engine: Engine, table) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(table))


def save_all(store: AuditStore, records: list[JudgmentRecord]) -> None:
    for record in records:
        store.save(record)


def listed_ids(store: AuditStore, query: JudgmentQuery) -> list[str]:
    return [item.id for item in store.list(query, limit=100, cursor=None).items]


def test_save_get_round_trip(store):
    record = make_record()
    store.save(record)

    loaded = store.get(record.id)

    assert loaded == record
    assert loaded.trace == record.trace
    assert loaded.created_at.tzinfo == timezone.utc
    assert loaded.completed_at.tzinfo == timezone.utc


def test_get_converts_offsets_to_utc(store):
    local_time = datetime(2026, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(created_at=local_time)
    store.save(record)

    loaded = store.get(record.id)

    assert loaded.created_at == datetime(2026, 5, 1, 12, 30, tzinfo=timezone.utc)
    assert loaded.created_at.utcoffset() == timedelta(0)


def test_get_unknown_id_returns_none(store):
    assert store.get(new_judgment_id()) is None


def test_save_without_trace(store, engine):
    record = dataclasses.replace(make_record(), trace=None)
    store.save(record)

    assert store.get(record.id).trace is None
    assert count_rows(engine, Trace) == 0


def test_save_rejects_naive_datetime(store, engine):
    record = dataclasses.replace(make_record(), created_at=datetime(2026, 5, 1, 12, 0))

    with pytest.raises(ValueError, match="created_at=2026-05-01T12:00:00 is a naive datetime"):
        store.save(record)
    assert count_rows(engine, Judgment) == 0


def test_duplicate_verdict_leaves_nothing(store, engine, caplog):
    record = make_record()
    record.verdicts.append(dataclasses.replace(record.verdicts[0]))

    with caplog.at_level(logging.ERROR, logger="server.store.repository"):
        with pytest.raises(StoreUnavailableError, match=f"could not save judgment {record.id}") as raised:
            store.save(record)

    assert raised.value.__cause__ is not None
    assert record.id in caplog.text
    assert store.get(record.id) is None
    assert count_rows(engine, Judgment) == 0
    assert count_rows(engine, Verdict) == 0
    assert count_rows(engine, Trace) == 0


def test_duplicate_id_keeps_first_record(store, engine):
    first = make_record()
    store.save(first)
    second = dataclasses.replace(make_record(), id=first.id, output="a different output")

    with pytest.raises(StoreUnavailableError, match=f"could not save judgment {first.id}: ") as raised:
        store.save(second)

    # The driver's exception class differs by backend (sqlite3.IntegrityError, psycopg's
    # UniqueViolation), and SQLAlchemy wraps both in its IntegrityError.
    assert isinstance(raised.value.__cause__, IntegrityError)
    assert store.get(first.id) == first
    assert count_rows(engine, Judgment) == 1
    assert count_rows(engine, Verdict) == len(first.verdicts)


def test_error_message_hides_prompt(store):
    first = make_record()
    store.save(first)
    second = dataclasses.replace(make_record(), id=first.id, prompt={"prompt": "secret prompt text"})

    with pytest.raises(StoreUnavailableError) as raised:
        store.save(second)

    assert "secret prompt text" not in str(raised.value)
    assert "secret prompt text" not in str(raised.value.__cause__)


def test_unreachable_database_raises_unavailable(tmp_path):
    # The parent directory does not exist, and a plain engine does not create it.
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'store.db'}")
    store = AuditStore(engine)

    with pytest.raises(StoreUnavailableError, match="could not save judgment"):
        store.save(make_record())
    with pytest.raises(StoreUnavailableError, match="could not read judgment"):
        store.get(new_judgment_id())
    with pytest.raises(StoreUnavailableError, match="could not list judgments"):
        store.list(JudgmentQuery(), limit=10, cursor=None)


def test_list_newest_first(store):
    records = [make_record(created_at=BASE_TIME + timedelta(minutes=i)) for i in range(3)]
    save_all(store, records)

    page = store.list(JudgmentQuery(), limit=10, cursor=None)

    assert [item.id for item in page.items] == [record.id for record in reversed(records)]
    assert page.next_cursor is None


def test_list_omits_trace_keeps_verdicts(store):
    record = make_record()
    store.save(record)

    [item] = store.list(JudgmentQuery(), limit=10, cursor=None).items

    assert item.trace is None
    assert item.verdicts == record.verdicts
    assert item == dataclasses.replace(record, trace=None)


def test_list_filters_time_range(store):
    records = [make_record(created_at=BASE_TIME + timedelta(hours=i)) for i in range(4)]
    save_all(store, records)
    ids = [record.id for record in records]

    assert listed_ids(store, JudgmentQuery(since=BASE_TIME + timedelta(hours=1))) == ids[:0:-1]
    assert listed_ids(store, JudgmentQuery(until=BASE_TIME + timedelta(hours=2))) == [ids[1], ids[0]]
    both = JudgmentQuery(since=BASE_TIME + timedelta(hours=1), until=BASE_TIME + timedelta(hours=3))
    assert listed_ids(store, both) == [ids[2], ids[1]]


def test_list_filters_score_range(store):
    low = make_record(scores={"causality": 0.2, "reciprocity": 0.95})
    middle = make_record(scores={"causality": 0.5})
    high = make_record(scores={"causality": 0.9})
    other = make_record(scores={"reciprocity": 0.5})
    save_all(store, [low, middle, high, other])

    in_range = JudgmentQuery(constraint="causality", min_score=0.5, max_score=0.9)
    assert listed_ids(store, in_range) == [high.id, middle.id]
    assert listed_ids(store, JudgmentQuery(constraint="causality", max_score=0.5)) == [middle.id, low.id]
    assert listed_ids(store, JudgmentQuery(constraint="causality")) == [high.id, middle.id, low.id]
    assert listed_ids(store, JudgmentQuery(constraint="reciprocity", min_score=0.9)) == [low.id]


def test_list_filters_passed(store):
    failed = make_record(scores={"causality": 0.1, "reciprocity": 0.9}, flagged=True)
    passed = make_record(scores={"causality": 0.7, "reciprocity": 0.2}, flagged=True)
    save_all(store, [failed, passed])

    assert listed_ids(store, JudgmentQuery(constraint="causality", passed=True)) == [passed.id]
    assert listed_ids(store, JudgmentQuery(constraint="causality", passed=False)) == [failed.id]
    assert listed_ids(store, JudgmentQuery(constraint="reciprocity", passed=False)) == [passed.id]


def test_list_filters_flagged(store):
    clean = make_record(flagged=False)
    flagged = make_record(flagged=True)
    save_all(store, [clean, flagged])

    assert listed_ids(store, JudgmentQuery(flagged=True)) == [flagged.id]
    assert listed_ids(store, JudgmentQuery(flagged=False)) == [clean.id]
    assert listed_ids(store, JudgmentQuery()) == [flagged.id, clean.id]


def test_list_combines_filters(store):
    match = make_record(created_at=BASE_TIME + timedelta(hours=1), flagged=True, scores={"causality": 0.1})
    too_early = make_record(created_at=BASE_TIME, flagged=True, scores={"causality": 0.1})
    not_flagged = make_record(created_at=BASE_TIME + timedelta(hours=1), scores={"causality": 0.1})
    save_all(store, [match, too_early, not_flagged])

    query = JudgmentQuery(since=BASE_TIME + timedelta(minutes=30), constraint="causality", passed=False, flagged=True)
    assert listed_ids(store, query) == [match.id]


def test_cursor_pages_25_records(store):
    records = [make_record(created_at=BASE_TIME + timedelta(seconds=i)) for i in range(25)]
    save_all(store, records)

    pages = []
    cursor = None
    for _ in range(3):
        page = store.list(JudgmentQuery(), limit=10, cursor=cursor)
        pages.append(page)
        cursor = page.next_cursor

    assert [len(page.items) for page in pages] == [10, 10, 5]
    assert pages[0].next_cursor is not None
    assert pages[1].next_cursor is not None
    assert pages[2].next_cursor is None
    seen = [item.id for page in pages for item in page.items]
    assert len(set(seen)) == 25
    assert seen == sorted((record.id for record in records), reverse=True)


def test_cursor_paging_keeps_filters(store):
    records = [make_record(flagged=i % 2 == 0) for i in range(7)]
    save_all(store, records)
    flagged_ids = sorted((record.id for record in records if record.flagged), reverse=True)

    first = store.list(JudgmentQuery(flagged=True), limit=3, cursor=None)
    second = store.list(JudgmentQuery(flagged=True), limit=3, cursor=first.next_cursor)

    assert [item.id for item in first.items] == flagged_ids[:3]
    assert [item.id for item in second.items] == flagged_ids[3:]
    assert second.next_cursor is None


def test_exact_page_has_no_next(store):
    save_all(store, [make_record() for _ in range(10)])

    page = store.list(JudgmentQuery(), limit=10, cursor=None)

    assert len(page.items) == 10
    assert page.next_cursor is None


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "aGVsbG8",  # base64 of "hello"
        _encode_cursor("0196a6f2-1c3b-7abc-8def-0123456789ab").upper(),
        _encode_cursor("0196A6F2-1C3B-7ABC-8DEF-0123456789AB"),  # not the canonical lowercase form
        "",
        "é",
    ],
)
def test_invalid_cursor_raises(store, cursor):
    with pytest.raises(InvalidCursorError, match="this server did not issue it. Restart paging without a cursor"):
        store.list(JudgmentQuery(), limit=10, cursor=cursor)


def test_list_rejects_zero_limit(store):
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        store.list(JudgmentQuery(), limit=0, cursor=None)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_score": 0.5}, "min_score=0.5 filters the verdict of one constraint, so constraint must be set too"),
        ({"passed": True}, "passed=True filters the verdict of one constraint, so constraint must be set too"),
        (
            {"constraint": "causality", "min_score": 0.8, "max_score": 0.2},
            "min_score 0.8 is greater than max_score 0.2",
        ),
        ({"since": datetime(2026, 5, 1)}, "since=2026-05-01T00:00:00 is a naive datetime"),
    ],
)
def test_query_rejects_invalid_filters(arguments, message):
    with pytest.raises(ValueError, match=message):
        JudgmentQuery(**arguments)


def test_saved_judgment_survives_sigkill(engine, tmp_path):
    url = engine.url.render_as_string(hide_password=False)
    record = make_record()
    record_file = tmp_path / "record.pickle"
    record_file.write_bytes(pickle.dumps(record))
    # The child saves the record and kills itself before the engine can close
    # its connections, so only what the commit made durable remains.
    script = (
        "import os, pickle, signal, sys\n"
        "from server.store import AuditStore, create_engine_for\n"
        "record = pickle.loads(open(sys.argv[2], 'rb').read())\n"
        "AuditStore(create_engine_for(sys.argv[1])).save(record)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )

    child = subprocess.run([sys.executable, "-c", script, url, str(record_file)], timeout=60)

    assert child.returncode == -signal.SIGKILL
    assert AuditStore(engine).get(record.id) == record


def test_delete_cascades_to_children(store, engine):
    # save() and finish() also append an integrity leaf, whose foreign key has no
    # cascade and blocks the delete, so the children are added to a started judgment.
    record = make_record()
    store.start(make_started(record))
    with engine.begin() as connection:
        verdict_rows = [{"judgment_id": record.id, **dataclasses.asdict(verdict)} for verdict in record.verdicts]
        connection.execute(insert(Verdict), verdict_rows)
        trace_row = {"judgment_id": record.id, "format_version": TRACE_FORMAT_VERSION, "data": record.trace}
        connection.execute(insert(Trace), [trace_row])
    assert count_rows(engine, Verdict) == 2
    assert count_rows(engine, Trace) == 1

    with engine.begin() as connection:
        connection.execute(delete(Judgment).where(Judgment.id == record.id))

    assert count_rows(engine, Verdict) == 0
    assert count_rows(engine, Trace) == 0


def test_pragmas_on_new_connection(sqlite_engine):
    # SQLite only: create_engine_for sets these pragmas on SQLite connections alone.
    with sqlite_engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000


def test_postgresql_compresses_with_lz4(postgresql_engine):
    with postgresql_engine.connect() as connection:
        methods = connection.execute(
            text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")).scalar_one()
        method = connection.execute(text("SHOW default_toast_compression")).scalar_one()

    # A server built without lz4 keeps its default, pglz.
    assert method == ("lz4" if "lz4" in methods else "pglz")


def test_lz4_rejected_keeps_default(caplog):
    class DriverError(Exception):
        pass

    class Connection:
        rolled_back = False

        def cursor(self):
            raise DriverError('invalid value for parameter "default_toast_compression": "lz4"')

        def rollback(self):
            self.rolled_back = True

    connection = Connection()

    with caplog.at_level(logging.WARNING, logger="server.store.db"):
        _set_postgresql_compression(DriverError, connection, None)

    assert connection.rolled_back
    assert "rejected default_toast_compression=lz4" in caplog.text
    assert 'invalid value for parameter "default_toast_compression"' in caplog.text


def test_engine_creates_parent_directory(tmp_path):
    # SQLite only: a PostgreSQL URL names a server, not a file.
    database = tmp_path / "nested" / "deeper" / "store.db"
    engine = create_engine_for(f"sqlite:///{database}")

    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    engine.dispose()

    assert database.exists()


def test_new_judgment_id_is_uuid7():
    judgment_id = new_judgment_id()
    parsed = uuid.UUID(judgment_id)

    assert str(parsed) == judgment_id
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    unix_ms = parsed.int >> 80
    assert abs(unix_ms - time.time() * 1000) < 5000


def test_later_ids_sort_after():
    earlier = new_judgment_id()
    time.sleep(0.002)
    later = new_judgment_id()

    assert later > earlier
    assert sorted([later, earlier]) == [earlier, later]


def test_ids_are_unique():
    ids = {new_judgment_id() for _ in range(10_000)}

    assert len(ids) == 10_000


POLICY = {"name": "strict", "action": "flag", "constraints": {"causality": {"threshold": 0.7}}, "triggered": False}


@pytest.mark.parametrize("status", ["completed", "cancelled", "failed"])
def test_start_then_finish(store, engine, status):
    final = dataclasses.replace(make_record(), status=status, policy=POLICY)
    store.start(make_started(final))

    store.finish(final)

    assert store.get(final.id) == final
    assert count_rows(engine, Judgment) == 1
    assert count_rows(engine, Verdict) == len(final.verdicts)
    assert count_rows(engine, Trace) == 1


def test_finish_without_trace(store, engine):
    final = dataclasses.replace(make_record(), status="cancelled", trace=None)
    store.start(make_started(final))

    store.finish(final)

    assert store.get(final.id) == final
    assert count_rows(engine, Trace) == 0


def test_started_judgment_read_back(store):
    started = dataclasses.replace(make_started(make_record()), policy=POLICY)
    store.start(started)

    loaded = store.get(started.id)

    assert loaded == started
    assert loaded.status == "started"
    assert loaded.completed_at is None
    assert loaded.finish_reason is None
    assert loaded.latency_ms is None
    assert loaded.verdicts == []
    assert loaded.trace is None


def test_list_filters_status(store):
    completed = make_record()
    store.save(completed)
    started = make_started(make_record())
    store.start(started)

    assert listed_ids(store, JudgmentQuery(status="started")) == [started.id]
    assert listed_ids(store, JudgmentQuery(status="completed")) == [completed.id]
    assert listed_ids(store, JudgmentQuery(status="failed")) == []
    assert listed_ids(store, JudgmentQuery()) == [started.id, completed.id]
    [item] = store.list(JudgmentQuery(status="started"), limit=10, cursor=None).items
    assert item == started


def test_finish_twice_rejected(store, engine):
    final = make_record()
    store.start(make_started(final))
    store.finish(final)
    again = dataclasses.replace(final, status="failed", output="a different output", verdicts=[])

    expected = f"Cannot finish judgment {final.id}: its status is 'completed', not 'started'"
    with pytest.raises(JudgmentStateError, match=expected) as raised:
        store.finish(again)

    assert raised.value.judgment_id == final.id
    assert raised.value.status == "completed"
    assert store.get(final.id) == final
    assert count_rows(engine, Verdict) == len(final.verdicts)


def test_finish_without_start_rejected(store, engine):
    final = make_record()

    expected = f"Cannot finish judgment {final.id}: no judgment has that id. Store it with start"
    with pytest.raises(JudgmentStateError, match=expected) as raised:
        store.finish(final)

    assert raised.value.status is None
    assert count_rows(engine, Judgment) == 0
    assert count_rows(engine, Verdict) == 0
    assert count_rows(engine, Trace) == 0


def test_finish_saved_judgment_rejected(store):
    record = make_record()
    store.save(record)

    with pytest.raises(JudgmentStateError, match="its status is 'completed', not 'started'"):
        store.finish(dataclasses.replace(record, verdicts=[], trace=None))

    assert store.get(record.id) == record


def test_failed_finish_leaves_started(store, engine, caplog):
    final = make_record()
    started = make_started(final)
    store.start(started)
    broken = dataclasses.replace(final, verdicts=[*final.verdicts, dataclasses.replace(final.verdicts[0])])

    with caplog.at_level(logging.ERROR, logger="server.store.repository"):
        with pytest.raises(StoreUnavailableError, match=f"could not finish judgment {final.id}: ") as raised:
            store.finish(broken)

    assert isinstance(raised.value.__cause__, IntegrityError)
    assert final.id in caplog.text
    assert store.get(final.id) == started
    assert count_rows(engine, Verdict) == 0
    assert count_rows(engine, Trace) == 0

    store.finish(final)

    assert store.get(final.id) == final


def test_concurrent_finish_updates_once(store, engine):
    final = make_record()
    store.start(make_started(final))
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def finish(status: str) -> None:
        barrier.wait()
        try:
            store.finish(dataclasses.replace(final, status=status))
            outcomes.append(status)
        except JudgmentStateError:
            outcomes.append("rejected")

    threads = [threading.Thread(target=finish, args=(status,)) for status in ("completed", "cancelled")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes) in (["cancelled", "rejected"], ["completed", "rejected"])
    [finished_as] = [outcome for outcome in outcomes if outcome != "rejected"]
    assert store.get(final.id).status == finished_as
    assert count_rows(engine, Verdict) == len(final.verdicts)


def test_start_unreachable_database(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'missing' / 'store.db'}")
    store = AuditStore(engine)
    final = make_record()

    with pytest.raises(StoreUnavailableError, match=f"could not start judgment {final.id}"):
        store.start(make_started(final))
    with pytest.raises(StoreUnavailableError, match=f"could not finish judgment {final.id}"):
        store.finish(final)


def test_start_duplicate_id_raises_unavailable(store):
    started = make_started(make_record())
    store.start(started)

    with pytest.raises(StoreUnavailableError, match=f"could not start judgment {started.id}: ") as raised:
        store.start(dataclasses.replace(started, output="other"))

    assert isinstance(raised.value.__cause__, IntegrityError)
    assert store.get(started.id) == started


def test_policy_round_trips(store, engine):
    without_policy = make_record()
    with_policy = dataclasses.replace(make_record(), policy=POLICY)
    save_all(store, [without_policy, with_policy])

    assert store.get(with_policy.id).policy == POLICY
    assert store.get(without_policy.id).policy is None
    [listed, _] = store.list(JudgmentQuery(), limit=10, cursor=None).items
    assert listed.policy == POLICY
    # None is stored as SQL NULL, not as the JSON text "null".
    with engine.connect() as connection:
        null_ids = connection.scalars(select(Judgment.id).where(Judgment.policy.is_(None))).all()
    assert null_ids == [without_policy.id]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"status": "completed"}, "start() takes a record with status 'started', got 'completed'"),
        ({"verdicts": make_record().verdicts}, "start() takes a record without verdicts and trace, got 2 verdicts"),
        ({"trace": {"tokens": []}}, "got 0 verdicts and a trace"),
        ({"completed_at": BASE_TIME}, "start() takes a record with completed_at=None"),
        ({"finish_reason": "stop"}, "start() takes a record with finish_reason=None, got 'stop'"),
        ({"latency_ms": 12.5}, "start() takes a record with latency_ms=None, got 12.5"),
        ({"created_at": datetime(2026, 5, 1, 12, 0)}, "created_at=2026-05-01T12:00:00 is a naive datetime"),
    ],
)
def test_start_rejects_invalid_record(store, engine, changes, message):
    record = dataclasses.replace(make_started(make_record()), **changes)

    with pytest.raises(ValueError, match=re.escape(message)):
        store.start(record)

    assert count_rows(engine, Judgment) == 0


@pytest.mark.parametrize("method", ["save", "finish"])
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"status": "started"},
            "{method}() takes a record whose status is one of 'completed', 'cancelled', 'failed', got 'started'",
        ),
        ({"status": "done"}, "{method}() takes a record whose status is one of"),
        ({"completed_at": None}, "{method}() takes a record with completed_at set, got None"),
        ({"completed_at": datetime(2026, 5, 1, 12, 0)}, "completed_at=2026-05-01T12:00:00 is a naive datetime"),
    ],
)
def test_final_write_rejects_invalid_record(store, engine, method, changes, message):
    final = make_record()
    started = make_started(final)
    store.start(started)
    record = dataclasses.replace(final, id=new_judgment_id() if method == "save" else final.id, **changes)

    with pytest.raises(ValueError, match=re.escape(message.format(method=method))):
        getattr(store, method)(record)

    assert count_rows(engine, Judgment) == 1
    assert store.get(final.id) == started


def test_query_rejects_unknown_status():
    with pytest.raises(ValueError, match="status='done' is not a judgment status. Use one of 'started', 'completed'"):
        JudgmentQuery(status="done")


def test_unwritable_sqlite_directory_names_directory_and_uid(tmp_path, monkeypatch):
    """As in a container whose volume belongs to another uid: the error names the directory and the uid."""
    # Root may write anywhere, so the access check returns what it would for a user without write access.
    monkeypatch.setattr(db_module.os, "access", lambda path, mode: False)

    with pytest.raises(RuntimeError, match=f"{tmp_path / 'data'} is missing or not writable by this process "
                                           rf"\(uid {os.getuid()}\)"):
        create_engine_for(f"sqlite:///{tmp_path / 'data' / 'tracehead.db'}")
