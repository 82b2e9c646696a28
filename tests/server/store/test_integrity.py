"""The integrity log on SQLite and PostgreSQL: leaves, proofs, signed heads, tamper detection, erasure."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Engine, func, select, text

from server.store import AuditStore, StoreUnavailableError, create_engine_for, integrity, merkle, upgrade_database
from server.store.audit_log import IntegrityLog, JudgmentNotFoundError, ProofRangeError
from server.store.integrity import TreeHeadSigner, load_or_create_key, verify_head_signature
from server.store.tables import IntegrityLeaf, Judgment
from tests.server.store.test_repository import BASE_TIME, engine, make_record, make_started, store  # noqa: F401 (fixtures)

RECORDS = 7
# Processes and records per process of the concurrent-writer test.
WRITERS, RECORDS_PER_WRITER = 4, 15


@pytest.fixture
def log(engine) -> IntegrityLog:
    return IntegrityLog(engine, TreeHeadSigner(Ed25519PrivateKey.generate()))


@pytest.fixture
def saved(store) -> list:
    """Seven judgments: five saved in one go, two streamed (started, then finished)."""
    records = [make_record(created_at=BASE_TIME + timedelta(minutes=i)) for i in range(RECORDS)]
    for record in records[:5]:
        store.save(record)
    for record in records[5:]:
        store.start(make_started(record))
        store.finish(record)
    return records


def execute(engine: Engine, statement: str, **values) -> None:
    with engine.begin() as connection:
        connection.execute(text(statement), values)


def named(report) -> set[str]:
    return {mismatch.judgment_id for mismatch in report.mismatches}


def test_every_finished_judgment_gets_one_leaf(saved, log, engine):
    report = log.verify()

    assert report.ok, report.mismatches
    assert report.leaves == RECORDS
    with engine.connect() as connection:
        indexes = connection.execute(select(IntegrityLeaf.leaf_index, IntegrityLeaf.judgment_id)
                                     .order_by(IntegrityLeaf.leaf_index)).all()
    assert [index for index, _ in indexes] == list(range(RECORDS))
    assert [judgment_id for _, judgment_id in indexes] == [record.id for record in saved]


def test_started_judgment_has_no_leaf_until_finished(store, log):
    record = make_record()
    store.start(make_started(record))

    report = log.verify()
    assert report.ok
    assert report.leaves == 0
    assert report.unfinished == 1

    store.finish(record)
    assert log.verify().leaves == 1


def test_root_matches_leaves_recomputed_from_records(saved, log):
    expected = merkle.root_from_leaves(merkle.leaf_hash(bytes.fromhex(log.inclusion_proof(record.id).record_hash))
                                       for record in saved)

    assert log.root_at(RECORDS) == expected.hex()
    assert log.verify().root == expected.hex()


def test_inclusion_proofs_verify(saved, log):
    for size in (5, RECORDS):
        root = bytes.fromhex(log.root_at(size))
        for record in saved[:size]:
            proof = log.inclusion_proof(record.id, size)
            path = [bytes.fromhex(digest) for digest in proof.audit_path]
            assert merkle.verify_inclusion(bytes.fromhex(proof.leaf_hash), proof.leaf_index, size, path, root)


def test_inclusion_proof_errors(saved, log):
    with pytest.raises(JudgmentNotFoundError):
        log.inclusion_proof("no-such-id")
    with pytest.raises(ProofRangeError, match="at most the log's size 7"):
        log.inclusion_proof(saved[0].id, RECORDS + 1)
    with pytest.raises(ProofRangeError, match="above the judgment's leaf index 6"):
        log.inclusion_proof(saved[6].id, 3)


def test_consistency_proofs_verify(saved, log):
    for first in range(1, RECORDS + 1):
        proof = [bytes.fromhex(digest) for digest in log.consistency_proof(first, RECORDS)]
        assert merkle.verify_consistency(first, RECORDS, bytes.fromhex(log.root_at(first)),
                                         bytes.fromhex(log.root_at(RECORDS)), proof)
    with pytest.raises(ProofRangeError, match="0 < first <= second <= 7"):
        log.consistency_proof(3, RECORDS + 1)


def test_tree_head_signed_and_reused(saved, log, store):
    head = log.tree_head()

    assert head.tree_size == RECORDS
    assert head.root_hash == log.root_at(RECORDS)
    assert verify_head_signature(head, log.signer.public_key_bytes)
    assert not verify_head_signature(head, TreeHeadSigner(Ed25519PrivateKey.generate()).public_key_bytes)
    assert log.tree_head() == head

    store.save(make_record())
    assert log.tree_head().tree_size == RECORDS + 1


@pytest.mark.parametrize(("statement", "what"), [
    ("UPDATE judgments SET output = 'The capital of France is Lyon.' WHERE id = :id", "output"),
    ("UPDATE judgments SET prompt = '{\"prompt\": \"changed\"}' WHERE id = :id", "prompt"),
    ("UPDATE traces SET data = '{\"tokens\": [{\"id\": 504, \"text\": \"The\", \"logprob\": -0.1, "
     "\"scores\": {\"decidability\": 0.91}}]}' WHERE judgment_id = :id", "trace value"),
    ("UPDATE verdicts SET score = 0.95 WHERE judgment_id = :id AND \"constraint\" = 'decidability'", "verdict"),
    ("UPDATE judgments SET flagged = NOT flagged WHERE id = :id", "flag"),
    ("UPDATE judgments SET metadata = '{\"tenant\": \"other\"}' WHERE id = :id", "metadata"),
    ("DELETE FROM verdicts WHERE judgment_id = :id AND \"constraint\" = 'testifiability'", "deleted verdict"),
])
def test_editing_a_judgment_names_it(saved, log, engine, statement, what):
    target = saved[3]
    execute(engine, statement, id=target.id)

    report = log.verify()

    assert not report.ok, f"editing the {what} went unnoticed"
    assert named(report) == {target.id}


def test_unreadable_json_names_the_judgment(saved, log, engine):
    if engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL rejects invalid JSON on write, so only SQLite can hold it")
    execute(engine, "UPDATE traces SET data = substr(data, 1, 20) WHERE judgment_id = :id", id=saved[4].id)

    report = log.verify()

    assert named(report) == {saved[4].id}
    assert "no longer readable" in report.mismatches[0].problem
    assert report.leaves == RECORDS


def test_edit_with_recomputed_leaf_breaks_signed_root(saved, log, engine):
    log.tree_head()
    target = saved[2]
    execute(engine, "UPDATE judgments SET output = 'changed' WHERE id = :id", id=target.id)
    # Recompute the leaf as a forger would, so that the record matches its leaf again.
    forged = dataclasses.replace(target, output="changed")
    payload = integrity.payload_hash(forged)
    record = integrity.record_hash(forged, payload)
    leaf = merkle.leaf_hash(bytes.fromhex(record)).hex()
    execute(engine, "UPDATE integrity_leaves SET payload_hash = :p, record_hash = :r, leaf_hash = :l "
            "WHERE judgment_id = :id", p=payload, r=record, l=leaf, id=target.id)

    report = log.verify()

    problems = [mismatch.problem for mismatch in report.mismatches]
    assert any("no longer hash to the root signed at size 7" in problem for problem in problems)


def test_check_forged_leaf_fails(saved, log, engine):
    log.tree_head()
    target = saved[2]
    forged = dataclasses.replace(target, output="changed")
    payload = integrity.payload_hash(forged)
    record = integrity.record_hash(forged, payload)
    execute(engine, "UPDATE judgments SET output = 'changed' WHERE id = :id", id=target.id)
    execute(engine, "UPDATE integrity_leaves SET payload_hash = :p, record_hash = :r, leaf_hash = :l "
            "WHERE judgment_id = :id", p=payload, r=record, l=merkle.leaf_hash(bytes.fromhex(record)).hex(),
            id=target.id)

    check = log.check_judgment(target.id)

    assert (check.record, check.inclusion, check.signature) == (True, False, True)
    assert check.status == "failed"
    assert check.problems == ["the audit path of leaf 2 does not lead to the root signed at size 7"]
    # Leaf 5's path reads the stored node over leaves 0 to 3, not the forged leaf.
    assert log.check_judgment(saved[5].id).status == "verified"


def test_check_other_tenant_not_found(saved, log):
    with pytest.raises(JudgmentNotFoundError):
        log.check_judgment(saved[0].id, tenant="someone-else")
    assert log.check_judgment(saved[0].id, tenant=saved[0].tenant).status == "verified"


def test_erased_payload_still_verifies(saved, log, store):
    target = saved[1]
    proof_before = log.inclusion_proof(target.id)

    erasure = log.erase(target.id, "dpo@example.org", "privacy request")

    stored = store.get(target.id)
    assert stored.output == ""
    assert stored.prompt == {}
    assert stored.trace is None
    assert erasure.erased_by == "dpo@example.org"
    assert log.erasure(target.id).reason == "privacy request"
    report = log.verify()
    assert report.ok, report.mismatches
    assert report.erased == 1
    assert log.inclusion_proof(target.id) == proof_before
    with pytest.raises(ValueError, match="already erased"):
        log.erase(target.id, "dpo@example.org", "again")


def test_erasing_unknown_judgment_fails(log):
    with pytest.raises(JudgmentNotFoundError):
        log.erase("no-such-id", "me", "test")


def test_retention_erases_old_payloads_only(store, log):
    old = make_record(created_at=BASE_TIME)
    new = make_record(created_at=BASE_TIME + timedelta(days=40))
    store.save(old)
    store.save(new)

    erased = log.retain(30, now=BASE_TIME + timedelta(days=41))

    assert erased == 1
    assert store.get(old.id).output == ""
    assert store.get(new.id).output == new.output
    assert log.erasure(old.id).erased_by == "retention"
    assert log.verify().ok


def test_judgments_from_before_the_log_get_leaves(store, log, engine):
    records = [make_record(created_at=BASE_TIME + timedelta(minutes=i)) for i in range(3)]
    for record in records:
        store.save(record)
    # As a database migrated from before the log: judgments, but no leaves.
    execute(engine, "DELETE FROM merkle_nodes")
    execute(engine, "DELETE FROM integrity_leaves")
    execute(engine, "UPDATE integrity_state SET tree_size = 0")
    assert named(log.verify()) == {record.id for record in records}

    assert log.append_missing_leaves() == 3

    report = log.verify()
    assert report.ok, report.mismatches
    assert report.leaves == 3


def test_missing_leaf_row_is_reported(saved, log, engine):
    execute(engine, "DELETE FROM integrity_leaves WHERE leaf_index = 4")

    problems = [mismatch.problem for mismatch in log.verify().mismatches]

    assert "leaves 4 to 4 are missing" in problems
    assert any("finished but has no leaf" in problem for problem in problems)


def _write_records(url: str, count: int) -> None:
    engine = create_engine_for(url)
    store = AuditStore(engine)
    for _ in range(count):
        store.save(make_record())
    engine.dispose()


def test_concurrent_writers_make_one_gapless_log(engine, log):
    url = engine.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_records, args=(url, RECORDS_PER_WRITER)) for _ in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0

    report = log.verify()

    assert report.ok, report.mismatches
    with engine.connect() as connection:
        judgments = connection.execute(select(func.count()).select_from(Judgment)).scalar_one()
    assert report.leaves == judgments == WRITERS * RECORDS_PER_WRITER


@pytest.mark.parametrize("trace", [
    None,
    {"tokens": [{"text": "caf\u00e9 \u2028 \"quoted\" \\", "logprob": -1.5e-07, "scores": {"b": 1, "a": 0.25}}]},
    {},
])
def test_payload_hash_covers_whole_payload(trace):
    record = dataclasses.replace(make_record(), trace=trace, prompt={"prompt": "na\u00efve \U0001f600"},
                                 output="\u00dcber\nline")
    payload = {"prompt": record.prompt, "output": record.output, "trace": trace}
    whole = hashlib.sha256(integrity.canonical_json(payload)).hexdigest()

    assert integrity.payload_hash(record) == whole
    assert integrity.payload_hash(record, integrity.canonical_text(trace)) == whole


def test_signing_key_file_is_created_once(tmp_path):
    path = tmp_path / "keys" / "signing-key.pem"

    first = load_or_create_key(path)
    second = load_or_create_key(path)

    assert first.public_key_bytes == second.public_key_bytes
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(first.key_id) == 64


def _terminating_append(times: int):
    """Wrap append_leaves so that its first ``times`` calls kill their own database connection first."""
    calls = {"count": 0}
    original = integrity.append_leaves

    def append(connection, leaves):
        calls["count"] += 1
        if calls["count"] <= times:
            connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        return original(connection, leaves)

    return append, calls


def test_lost_connection_is_retried_once(postgresql_engine, monkeypatch):
    upgrade_database(postgresql_engine)
    store, log = AuditStore(postgresql_engine), IntegrityLog(postgresql_engine, None)
    append, calls = _terminating_append(times=1)
    monkeypatch.setattr(integrity, "append_leaves", append)
    record = make_record()

    store.save(record)

    assert calls["count"] == 2
    assert store.get(record.id).output == record.output
    assert log.verify().leaves == 1


def test_connection_lost_twice_is_unavailable(postgresql_engine, monkeypatch):
    upgrade_database(postgresql_engine)
    store = AuditStore(postgresql_engine)
    append, calls = _terminating_append(times=2)
    monkeypatch.setattr(integrity, "append_leaves", append)
    record = make_record()

    with pytest.raises(StoreUnavailableError, match=f"could not save judgment {record.id}"):
        store.save(record)

    assert calls["count"] == 2
    assert store.get(record.id) is None
