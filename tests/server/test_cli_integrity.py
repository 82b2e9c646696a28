"""`tracehead audit verify`, `erase` and `retain` on a SQLite store in a temporary data dir."""

import json
import sqlite3
from datetime import timedelta

import pytest

from server.cli import main
from server.settings import Settings
from server.store import AuditStore, JudgmentRecord, create_engine_for, upgrade_database
from server.store.audit_log import IntegrityLog
from server.store.integrity import load_or_create_key
from tests.server.store.test_repository import BASE_TIME, make_record


@pytest.fixture
def records(tmp_path, monkeypatch) -> list[JudgmentRecord]:
    """Save three judgments in the store of TRACEHEAD_DATA_DIR and sign a tree head over them."""
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TRACEHEAD_DATABASE_URL", raising=False)
    monkeypatch.delenv("TRACEHEAD_RETENTION_DAYS", raising=False)
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    upgrade_database(engine)
    saved = [make_record(BASE_TIME + timedelta(days=i)) for i in range(3)]
    store = AuditStore(engine)
    for record in saved:
        store.save(record)
    IntegrityLog(engine, load_or_create_key(Settings().resolved_signing_key_file)).tree_head()
    engine.dispose()
    return saved


def database(tmp_path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "tracehead.db")


def test_verify_passes_on_untouched_store(records, capsys):
    assert main(["audit", "verify"]) == 0

    out = capsys.readouterr().out
    assert "3 leaves checked (0 with erased payloads)" in out
    assert "latest signed head: size 3" in out
    assert "OK: the log verifies" in out


def test_verify_names_edited_judgment(records, tmp_path, capsys):
    with database(tmp_path) as connection:
        connection.execute("UPDATE verdicts SET threshold = 0.4 WHERE judgment_id = ?", (records[1].id,))

    assert main(["audit", "verify"]) == 1

    out = capsys.readouterr().out
    assert f"MISMATCH judgment {records[1].id} (leaf 1): its stored fields or verdicts differ" in out
    assert "FAILED: 1 problem\n" in out


def test_verify_json_report(records, tmp_path, capsys):
    with database(tmp_path) as connection:
        connection.execute("UPDATE judgments SET output = 'changed' WHERE id = ?", (records[0].id,))

    assert main(["audit", "verify", "--json"]) == 1

    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["leaves"] == 3
    assert report["signed_head"]["tree_size"] == 3
    assert report["mismatches"] == [{"judgment_id": records[0].id, "leaf_index": 0,
                                     "problem": "its prompt, output or trace differs from what was logged"}]


def test_erase_then_verify(records, capsys):
    assert main(["audit", "erase", records[2].id, "--reason", "privacy request", "--by", "dpo"]) == 0
    assert f"erased the payload of judgment {records[2].id}" in capsys.readouterr().out

    assert main(["audit", "verify"]) == 0
    assert "3 leaves checked (1 with erased payloads)" in capsys.readouterr().out


def test_erase_unknown_judgment_is_an_error(records, capsys):
    assert main(["audit", "erase", "no-such-id", "--reason", "x", "--by", "y"]) == 2

    assert "judgment no-such-id has no leaf in the integrity log" in capsys.readouterr().err


def test_retain_erases_old_payloads(records, capsys, monkeypatch):
    # BASE_TIME is long past, so a period of a few days covers every record.
    assert main(["audit", "retain", "--days", "3"]) == 0
    assert "erased the payloads of 3 judgments created more than 3 days ago" in capsys.readouterr().out

    monkeypatch.setenv("TRACEHEAD_RETENTION_DAYS", "3")
    assert main(["audit", "retain"]) == 0
    assert "erased the payloads of 0 judgments" in capsys.readouterr().out
    assert main(["audit", "verify"]) == 0


def test_retain_needs_a_period(records, capsys):
    assert main(["audit", "retain"]) == 2

    assert "pass --days N or set TRACEHEAD_RETENTION_DAYS" in capsys.readouterr().err


def test_since_head_accepts_extension_and_rejects_rewrite(records, tmp_path, capsys):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    log = IntegrityLog(engine, load_or_create_key(Settings().resolved_signing_key_file))
    head = tmp_path / "head.json"
    head.write_text(json.dumps(log.tree_head().as_dict()))
    AuditStore(engine).save(make_record())

    assert main(["audit", "verify", "--since-head", str(head)]) == 0
    capsys.readouterr()

    # Rewriting a leaf that the saved head covers changes the tree the head signed.
    with database(tmp_path) as connection:
        connection.execute("UPDATE integrity_leaves SET leaf_hash = ? WHERE leaf_index = 0", ("00" * 32,))
    assert main(["audit", "verify", "--since-head", str(head)]) == 1
    out = capsys.readouterr().out
    assert "does not extend the saved head at size 3" in out
    engine.dispose()


def test_since_head_with_bad_signature(records, tmp_path, capsys):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    head = IntegrityLog(engine, load_or_create_key(Settings().resolved_signing_key_file)).tree_head().as_dict()
    engine.dispose()
    head["root_hash"] = "11" * 32
    path = tmp_path / "head.json"
    path.write_text(json.dumps(head))

    assert main(["audit", "verify", "--since-head", str(path)]) == 1

    out = capsys.readouterr().out
    assert "the saved head at size 3 has an invalid signature for this key" in out


@pytest.mark.parametrize("days", ["-1", "0", "soon"])
def test_retain_rejects_periods_below_a_day(records, days, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["audit", "retain", "--days", days])

    assert raised.value.code == 2
    assert "--days must be" in capsys.readouterr().err
    assert main(["audit", "verify"]) == 0
    assert "(0 with erased payloads)" in capsys.readouterr().out


def test_verify_elsewhere_needs_the_public_key(records, tmp_path, capsys):
    public_key = load_or_create_key(Settings().resolved_signing_key_file).public_key_bytes.hex()
    (tmp_path / "signing-key.pem").rename(tmp_path / "moved-key.pem")

    assert main(["audit", "verify"]) == 2
    assert "pass --public-key HEX" in capsys.readouterr().err
    assert not (tmp_path / "signing-key.pem").exists()

    assert main(["audit", "verify", "--public-key", public_key]) == 0
    assert main(["audit", "verify", "--public-key", "abc"]) == 2
    assert "--public-key must be 64 hex digits" in capsys.readouterr().err


def test_since_head_reports_its_check_and_bad_files(records, tmp_path, capsys):
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    head = IntegrityLog(engine, load_or_create_key(Settings().resolved_signing_key_file)).tree_head().as_dict()
    engine.dispose()
    good, bad = tmp_path / "head.json", tmp_path / "bad.json"
    good.write_text(json.dumps(head))
    bad.write_text("not json")

    assert main(["audit", "verify", "--since-head", str(good)]) == 0
    assert "saved head at size 3: signature valid, and today's log extends it" in capsys.readouterr().out
    assert main(["audit", "verify", "--since-head", str(bad)]) == 2
    assert "not a tree head saved from GET /v1/audit/tree-head" in capsys.readouterr().err
