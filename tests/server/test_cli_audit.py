"""`tracehead audit query` and `tracehead audit export` on a SQLite store in a temporary data dir."""

import csv
import dataclasses
import io
import json
from datetime import timedelta

import pytest
from alembic import command

from server.cli import main
from server.store import AuditStore, JudgmentRecord, create_engine_for, upgrade_database
from server.store.db import run_migrations
from tests.server.store.test_repository import BASE_TIME, make_record

# The bundled heads' constraints in their order, which the CLI reads from heads.json.
BUNDLED_CONSTRAINTS = ["testifiability", "decidability", "reciprocity", "causality"]


@pytest.fixture
def records(tmp_path, monkeypatch) -> list[JudgmentRecord]:
    """Save three judgments, oldest first, in the store of TRACEHEAD_DATA_DIR."""
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TRACEHEAD_DATABASE_URL", raising=False)
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    upgrade_database(engine)
    saved = [
        dataclasses.replace(make_record(BASE_TIME, scores={"causality": 0.2, "decidability": 0.9}, flagged=True),
                            metadata={"team": "docs"}),
        dataclasses.replace(make_record(BASE_TIME + timedelta(minutes=1)), metadata={"team": "ops"},
                            output="Water boils at 100 degrees."),
        dataclasses.replace(make_record(BASE_TIME + timedelta(minutes=2), scores={"causality": 0.8}),
                            metadata={"team": "docs"}, model_name="other-model"),
    ]
    store = AuditStore(engine)
    for record in saved:
        store.save(record)
    engine.dispose()
    return saved


def printed_ids(capsys) -> list[str]:
    return [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]


def test_audit_query_prints_list_items(records, capsys):
    assert main(["audit", "query"]) == 0

    lines = capsys.readouterr().out.splitlines()
    items = [json.loads(line) for line in lines]
    assert [item["id"] for item in items] == [record.id for record in reversed(records)]
    newest = items[0]
    assert newest["model"] == "other-model"
    assert newest["metadata"] == {"team": "docs"}
    assert newest["text"] == records[2].output
    assert list(newest["judgment"]["constraints"]) == ["causality"]
    assert "trace" not in newest


@pytest.mark.parametrize("arguments, expected", [
    (["--metadata", "team=docs"], [2, 0]),
    (["--metadata", "team=docs", "--order", "oldest"], [0, 2]),
    (["--metadata", "team=docs", "--model", "other-model"], [2]),
    (["--text", "WATER boils"], [1]),
    (["--heads", "default-heads", "--order", "oldest", "--limit", "2"], [0, 1]),
    (["--flagged"], [0]),
    (["--no-flagged"], [2, 1]),
    (["--constraint", "causality", "--failed"], [0]),
    (["--constraint", "causality", "--passed", "--min-score", "0.5"], [2]),
    (["--since", "2026-05-01T12:01:00Z", "--until", "2026-05-01T14:02:00+02:00"], [1]),
    (["--kind", "score"], []),
    (["--status", "completed", "--limit", "1"], [2]),
], ids=["metadata", "oldest", "metadata-model", "text", "heads-limit", "flagged", "not-flagged", "failed",
        "passed-min-score", "time-range", "kind", "status-limit"])
def test_audit_query_filters(records, capsys, arguments, expected):
    assert main(["audit", "query", *arguments]) == 0

    assert printed_ids(capsys) == [records[index].id for index in expected]


@pytest.mark.parametrize("arguments, fragment", [
    (["--since", "2026-05-01T12:00:00"], "'2026-05-01T12:00:00' has no timezone; add one, e.g. 2026-05-01T12:00:00Z"),
    (["--since", "yesterday"], "'yesterday' is not an ISO 8601 time"),
    (["--metadata", "team"], "'team' is not KEY=VALUE, e.g. team=docs"),
    (["--limit", "0"], "'0' is not a whole number of at least 1"),
    (["--order", "random"], "invalid choice: 'random'"),
    (["--passed", "--failed"], "not allowed with argument"),
], ids=["naive-since", "since-text", "metadata-syntax", "limit-0", "order", "passed-and-failed"])
def test_audit_query_rejects_invalid_arguments(records, capsys, arguments, fragment):
    with pytest.raises(SystemExit) as exited:
        main(["audit", "query", *arguments])

    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("arguments, fragment", [
    (["--constraint", "honesty"], "unknown constraint 'honesty'; the heads in "),
    (["--min-score", "0.5"], "min_score=0.5 filters the verdict of one constraint, so constraint must be set too"),
    (["--metadata", "team=docs", "--metadata", "team=ops"], "a --metadata key is given twice"),
], ids=["unknown-constraint", "score-without-constraint", "repeated-metadata"])
def test_audit_query_rejects_invalid_filters(records, capsys, arguments, fragment):
    assert main(["audit", "query", *arguments]) == 2

    assert fragment in capsys.readouterr().err


def test_audit_export_jsonl_to_file(records, tmp_path, capsys):
    output = tmp_path / "judgments.jsonl"

    assert main(["audit", "export", "--output", str(output), "--include-trace", "--order", "oldest"]) == 0

    assert capsys.readouterr().out == f"Wrote 3 judgments to {output}\n"
    items = [json.loads(line) for line in output.read_text().splitlines()]
    assert [item["id"] for item in items] == [record.id for record in records]
    assert [item["trace"] for item in items] == [record.trace for record in records]


def test_audit_export_csv_to_stdout(records, capsys):
    assert main(["audit", "export", "--format", "csv", "--metadata", "team=docs"]) == 0

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out, newline="")))
    score_columns = [f"{name}_{field}" for name in BUNDLED_CONSTRAINTS for field in ("score", "passed")]
    assert list(rows[0])[-len(score_columns):] == score_columns
    assert [row["id"] for row in rows] == [records[2].id, records[0].id]
    newest, oldest = rows
    assert newest["model"] == "other-model"
    assert newest["causality_score"] == "0.8"
    assert newest["causality_passed"] == "true"
    assert newest["decidability_score"] == ""
    assert oldest["causality_passed"] == "false"
    assert oldest["flagged"] == "true"
    assert json.loads(oldest["metadata"]) == {"team": "docs"}


def test_audit_export_rejects_trace_in_csv(records, capsys):
    assert main(["audit", "export", "--format", "csv", "--include-trace"]) == 2

    assert "--include-trace applies to --format jsonl only" in capsys.readouterr().err


def test_audit_reports_missing_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv("TRACEHEAD_DATABASE_URL", raising=False)

    assert main(["audit", "query"]) == 2

    assert f"no audit database at {tmp_path / 'absent' / 'tracehead.db'}" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def test_audit_reports_old_revision(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("TRACEHEAD_DATABASE_URL", raising=False)
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    run_migrations(engine, command.upgrade, "0003")
    engine.dispose()

    assert main(["audit", "export"]) == 2

    error = capsys.readouterr().err
    assert "is at revision 0003" in error
    assert "run `tracehead db upgrade` first" in error
