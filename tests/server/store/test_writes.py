"""Group commit in the audit store, on SQLite and PostgreSQL: shared transactions, own errors, leaf order."""

from __future__ import annotations

import dataclasses
import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import IntegrityError

from server.store import (
    AuditStore,
    JudgmentStateError,
    StoreUnavailableError,
    integrity,
    merkle,
    repository,
    upgrade_database,
)
from server.store.audit_log import IntegrityLog
from server.store.tables import IntegrityLeaf, Judgment, Trace
from server.store.writes import prepare_write
from tests.server.store.test_group_commit import TIMEOUT_S, run_behind_held_group
from tests.server.store.test_repository import (  # noqa: F401 (engine and store are fixtures)
    BASE_TIME,
    count_rows,
    engine,
    make_record,
    make_started,
    store,
)

# Writer threads of the concurrency test, and the judgments each writes in turn.
WRITERS, WRITES_PER_WRITER = 8, 6


class GroupRecorder:
    """A write_group wrapper that records each group's judgment ids and thread, and can hold the first group."""

    def __init__(self, monkeypatch, hold_first: bool = False):
        self.groups: list[list[str]] = []
        self.threads: list[threading.Thread] = []
        self.first_started, self.release_first = threading.Event(), threading.Event()
        if not hold_first:
            self.release_first.set()
        original = repository.write_group

        def write_group(connection, writes):
            self.groups.append([write.judgment_id for write in writes])
            self.threads.append(threading.current_thread())
            if len(self.groups) == 1:
                self.first_started.set()
                assert self.release_first.wait(TIMEOUT_S)
            return original(connection, writes)

        monkeypatch.setattr(repository, "write_group", write_group)


def leaf_indexes(engine) -> dict[str, int]:
    with engine.connect() as connection:
        return dict(connection.execute(select(IntegrityLeaf.judgment_id, IntegrityLeaf.leaf_index)).all())


def write_in_turn(store: AuditStore, writer: int) -> list:
    """Write WRITES_PER_WRITER judgments one after another: saves from even writers, streams from odd ones."""
    records = [make_record(created_at=BASE_TIME + timedelta(minutes=writer, seconds=i))
               for i in range(WRITES_PER_WRITER)]
    for record in records:
        if writer % 2 == 0:
            store.save(record)
        else:
            store.start(make_started(record))
            store.finish(record)
    return records


def test_concurrent_writes_share_transactions(store, engine, monkeypatch):
    recorder = GroupRecorder(monkeypatch, hold_first=True)
    written: dict[int, list] = {}
    calls = {f"writer {n}": lambda n=n: written.__setitem__(n, write_in_turn(store, n)) for n in range(WRITERS)}

    outcomes = run_behind_held_group(store._writes, recorder.first_started, recorder.release_first,
                                     lambda: store.save(make_record()), calls)

    assert set(outcomes.values()) == {None}
    # Every writer's first write waited behind the held group, and they committed together.
    assert len(recorder.groups[1]) == WRITERS
    total = 1 + WRITERS * WRITES_PER_WRITER
    indexes = leaf_indexes(engine)
    assert sorted(indexes.values()) == list(range(total))
    for records in written.values():
        # A writer's judgments commit one after another, so their leaves come in the same order.
        in_commit_order = [indexes[record.id] for record in records]
        assert in_commit_order == sorted(in_commit_order)
    report = IntegrityLog(engine, None).verify()
    assert report.ok, report.mismatches
    assert report.leaves == total
    assert report.unfinished == 0


def test_bad_write_fails_only_its_caller(store, engine, monkeypatch):
    stored, finished, streamed = make_record(), make_record(), make_record()
    store.save(stored)
    store.start(make_started(finished))
    store.finish(finished)
    store.start(make_started(streamed))
    good_save, good_start, unknown = make_record(), make_record(), make_record()
    recorder = GroupRecorder(monkeypatch, hold_first=True)
    calls = {
        "good save": lambda: store.save(good_save),
        "duplicate id": lambda: store.save(dataclasses.replace(make_record(), id=stored.id)),
        "finish started": lambda: store.finish(streamed),
        "finish twice": lambda: store.finish(dataclasses.replace(finished, status="cancelled")),
        "finish unknown": lambda: store.finish(unknown),
        "good start": lambda: store.start(make_started(good_start)),
    }

    outcomes = run_behind_held_group(store._writes, recorder.first_started, recorder.release_first,
                                     lambda: store.save(make_record()), calls)

    # The shared transaction failed, so each of its writes was committed again on its own.
    assert len(recorder.groups[1]) == len(calls)
    assert [len(group) for group in recorder.groups[2:]] == [1] * len(calls)
    assert sorted(group[0] for group in recorder.groups[2:]) == sorted(recorder.groups[1])
    assert outcomes["good save"] is None
    assert outcomes["finish started"] is None
    assert outcomes["good start"] is None
    assert isinstance(outcomes["duplicate id"], StoreUnavailableError)
    assert isinstance(outcomes["duplicate id"].__cause__, IntegrityError)
    assert isinstance(outcomes["finish twice"], JudgmentStateError)
    assert outcomes["finish twice"].status == "completed"
    assert isinstance(outcomes["finish unknown"], JudgmentStateError)
    assert outcomes["finish unknown"].status is None
    assert store.get(stored.id) == stored
    assert store.get(streamed.id) == streamed
    assert store.get(good_start.id).status == "started"
    report = IntegrityLog(engine, None).verify()
    assert report.ok, report.mismatches
    # stored, finished, the leader's save, good save and the finished stream
    assert report.leaves == 5


def test_lone_save_commits_in_callers_thread(store, monkeypatch):
    recorder = GroupRecorder(monkeypatch)
    record = make_record()

    store.save(record)

    assert recorder.groups == [[record.id]]
    assert recorder.threads == [threading.current_thread()]


def test_finishes_commit_as_one_group(store, engine, monkeypatch):
    records = [make_record() for _ in range(4)]
    for record in records:
        store.start(make_started(record))
    recorder = GroupRecorder(monkeypatch)

    outcomes = store._commit_group([prepare_write(record, "finish") for record in records])

    # One transaction, with no fallback: the UPDATE's row count added up over the group.
    assert outcomes == [None] * len(records)
    assert recorder.groups == [[record.id for record in records]]
    for record in records:
        assert store.get(record.id) == record


def test_groups_of_any_size_build_the_tree(store, engine):
    log = IntegrityLog(engine, None)
    # Group sizes that start and end on both sides of many power-of-two boundaries; 50 leaves in all.
    sizes = [1, 2, 3, 1, 5, 8, 4, 7, 16, 3]
    records, boundaries = [], []
    for size in sizes:
        group = [make_record(created_at=BASE_TIME + timedelta(seconds=len(records) + i)) for i in range(size)]
        assert store._commit_group([prepare_write(record, "save") for record in group]) == [None] * size
        records += group
        boundaries.append(len(records))

    report = log.verify()
    assert report.ok, report.mismatches
    assert report.leaves == len(records)
    root = bytes.fromhex(log.root_at(len(records)))
    for record in records:
        proof = log.inclusion_proof(record.id)
        path = [bytes.fromhex(digest) for digest in proof.audit_path]
        assert merkle.verify_inclusion(bytes.fromhex(proof.leaf_hash), proof.leaf_index, len(records), path, root)
    for size in boundaries:
        proof = [bytes.fromhex(digest) for digest in log.consistency_proof(size, len(records))]
        assert merkle.verify_consistency(size, len(records), bytes.fromhex(log.root_at(size)), root, proof)


def test_trace_stored_as_canonical_json(store, engine):
    record = make_record()

    store.save(record)

    with engine.connect() as connection:
        stored_text = connection.execute(text("SELECT CAST(data AS TEXT) FROM traces")).scalar_one()
    assert stored_text == json.dumps(record.trace, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert store.get(record.id) == record


def test_trace_in_earlier_layout_verifies(store, engine):
    record = make_record()
    store.save(record)
    # The ORM wrote the JSON column with json.dumps defaults before traces were stored canonically.
    with engine.begin() as connection:
        connection.execute(update(Trace).where(Trace.judgment_id == record.id).values(data=record.trace))

    assert store.get(record.id) == record
    report = IntegrityLog(engine, None).verify()
    assert report.ok, report.mismatches


def test_nan_rejected_before_database(store, engine):
    record = make_record()
    record.verdicts[0].score = float("nan")

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        store.save(record)

    assert count_rows(engine, Judgment) == 0


def test_unserialisable_value_is_unavailable(store, engine):
    record = dataclasses.replace(make_record(), parameters={"seed": object()})

    with pytest.raises(StoreUnavailableError, match=f"could not save judgment {record.id}: TypeError: "):
        store.save(record)

    assert count_rows(engine, Judgment) == 0


def test_lost_connection_in_group_commits_each(postgresql_engine, monkeypatch):
    upgrade_database(postgresql_engine)
    store = AuditStore(postgresql_engine)
    original = integrity.append_leaves

    def append(connection, leaves):
        # Only the group of several writes loses its connection.
        if len(leaves) > 1:
            connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return original(connection, leaves)

    monkeypatch.setattr(integrity, "append_leaves", append)
    recorder = GroupRecorder(monkeypatch, hold_first=True)
    records = [make_record() for _ in range(3)]
    calls = {record.id: lambda record=record: store.save(record) for record in records}

    outcomes = run_behind_held_group(store._writes, recorder.first_started, recorder.release_first,
                                     lambda: store.save(make_record()), calls)

    assert set(outcomes.values()) == {None}
    assert [len(group) for group in recorder.groups] == [1, 3, 1, 1, 1]
    for record in records:
        assert store.get(record.id) == record
    report = IntegrityLog(postgresql_engine, None).verify()
    assert report.ok, report.mismatches
    assert report.leaves == 4
