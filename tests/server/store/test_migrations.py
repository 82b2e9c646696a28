import threading
from concurrent.futures import ThreadPoolExecutor

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, inspect, text

from server.store import create_engine_for, database_revision, head_revision, upgrade_database
from server.store.db import _alembic_config, run_migrations
from server.store.tables import Base

STORE_TABLES = {"judgments", "verdicts", "traces", "integrity_leaves", "merkle_nodes", "integrity_state",
                "tree_heads", "erasures", "api_keys"}
COMPLETION_COLUMNS = ("completed_at", "finish_reason", "latency_ms")


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def migrate(engine: Engine, direction, revision: str) -> None:
    run_migrations(engine, direction, revision)


def downgrade_to_base(engine: Engine) -> None:
    migrate(engine, command.downgrade, "base")


def test_head_revision_is_latest():
    assert head_revision() == "0006"


def test_new_database_has_no_revision(engine):
    assert database_revision(engine) is None
    assert table_names(engine) == set()


def test_upgrade_creates_tables(engine):
    upgrade_database(engine)

    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == head_revision()


def test_upgrade_twice_is_noop(engine):
    upgrade_database(engine)
    upgrade_database(engine)

    assert database_revision(engine) == head_revision()


def test_upgrade_creates_named_indexes(engine):
    upgrade_database(engine)
    inspector = inspect(engine)

    judgment_indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("judgments")}
    verdict_indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("verdicts")}
    assert judgment_indexes == {
        "ix_judgments_created_at": ["created_at"],
        "ix_judgments_flagged_created_at": ["flagged", "created_at"],
        "ix_judgments_kind_created_at": ["kind", "created_at"],
        "ix_judgments_status_created_at": ["status", "created_at"],
        "ix_judgments_model_name_created_at": ["model_name", "created_at"],
        "ix_judgments_heads_name_created_at": ["heads_name", "created_at"],
        "ix_judgments_tenant_created_at": ["tenant", "created_at"],
    }
    assert verdict_indexes == {
        "ix_verdicts_constraint_score": ["constraint", "score"],
        "ix_verdicts_constraint_passed_judgment_id": ["constraint", "passed", "judgment_id"],
    }
    assert inspector.get_pk_constraint("verdicts")["constrained_columns"] == ["judgment_id", "constraint"]


def test_foreign_keys_declare_cascade(engine):
    upgrade_database(engine)
    inspector = inspect(engine)

    for table in ("verdicts", "traces"):
        [foreign_key] = inspector.get_foreign_keys(table)
        assert foreign_key["name"] == f"fk_{table}_judgment_id_judgments"
        assert foreign_key["referred_table"] == "judgments"
        assert foreign_key["options"]["ondelete"] == "CASCADE"


def test_migration_matches_table_metadata(engine):
    upgrade_database(engine)

    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)

    assert differences == []


def test_downgrade_then_upgrade_again(engine):
    upgrade_database(engine)

    downgrade_to_base(engine)

    assert table_names(engine) == {"alembic_version"}
    assert database_revision(engine) is None

    upgrade_database(engine)

    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == head_revision()


def test_env_connects_from_url(engine):
    url = engine.url.render_as_string(hide_password=False)
    config = _alembic_config()
    # configparser treats "%" as interpolation, and a URL-quoted search_path option contains one.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))

    command.upgrade(config, "head")

    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == head_revision()


def insert_judgment(connection: Connection, judgment_id: str, **columns: object) -> None:
    """Insert a judgment as revision 0001 defines it, with one verdict and a trace."""
    values = {
        "id": judgment_id, "created_at": "2026-01-01 00:00:00", "completed_at": "2026-01-01 00:00:01",
        "request_id": "r", "model_name": "m", "model_fingerprint": "f", "heads_name": "h", "heads_fingerprint": "g",
        "prompt": "{}", "output": "text", "parameters": "{}", "finish_reason": "stop", "status": "completed",
        "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0, "flagged": False, "metadata": "{}",
    } | columns
    names = ", ".join(values)
    placeholders = ", ".join(f":{name}" for name in values)
    connection.execute(text(f"INSERT INTO judgments ({names}) VALUES ({placeholders})"), values)
    connection.execute(
        text("INSERT INTO verdicts VALUES (:id, 'causality', 0.5, 0.1, 3, 0.5, TRUE)"), {"id": judgment_id}
    )
    connection.execute(text("INSERT INTO traces VALUES (:id, 1, '{}')"), {"id": judgment_id})


def select_one(engine: Engine, sql: str) -> object:
    with engine.connect() as connection:
        return connection.execute(text(sql)).scalar_one()


def column_names(engine: Engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def nullable_columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("judgments") if column["nullable"]}


def child_row_counts(engine: Engine) -> tuple[object, object]:
    return select_one(engine, "SELECT COUNT(*) FROM verdicts"), select_one(engine, "SELECT COUNT(*) FROM traces")


def test_kind_migration_keeps_old_rows(engine):
    migrate(engine, command.upgrade, "0001")
    with engine.begin() as connection:
        insert_judgment(connection, "old")

    upgrade_database(engine)

    assert select_one(engine, "SELECT kind FROM judgments WHERE id = 'old'") == "generation"

    migrate(engine, command.downgrade, "0001")

    assert "kind" not in column_names(engine, "judgments")
    assert select_one(engine, "SELECT output FROM judgments WHERE id = 'old'") == "text"
    # The downgrade copies judgments on SQLite; the copy must not cascade to the children.
    assert child_row_counts(engine) == (1, 1)


def test_streamed_migration_relaxes_columns(engine):
    migrate(engine, command.upgrade, "0002")
    assert nullable_columns(engine) == set()

    migrate(engine, command.upgrade, "0003")

    assert nullable_columns(engine) == set(COMPLETION_COLUMNS) | {"policy"}

    migrate(engine, command.downgrade, "0002")

    assert nullable_columns(engine) == set()
    assert "policy" not in column_names(engine, "judgments")
    index_names = {index["name"] for index in inspect(engine).get_indexes("judgments")}
    assert "ix_judgments_status_created_at" not in index_names


def test_streamed_migration_keeps_children(engine):
    # On SQLite the upgrade and the downgrade copy judgments to a new table,
    # and with foreign keys on a bare copy would cascade-delete these rows.
    migrate(engine, command.upgrade, "0002")
    with engine.begin() as connection:
        insert_judgment(connection, "old")

    migrate(engine, command.upgrade, "0003")

    assert select_one(engine, "SELECT output FROM judgments WHERE id = 'old'") == "text"
    assert select_one(engine, "SELECT policy FROM judgments WHERE id = 'old'") is None
    assert child_row_counts(engine) == (1, 1)

    migrate(engine, command.downgrade, "0002")

    assert select_one(engine, "SELECT finish_reason FROM judgments WHERE id = 'old'") == "stop"
    assert child_row_counts(engine) == (1, 1)


def test_downgrade_fills_started_judgment(engine):
    upgrade_database(engine)
    with engine.begin() as connection:
        insert_judgment(
            connection, "started", status="started", completed_at=None, finish_reason=None, latency_ms=None
        )

    migrate(engine, command.downgrade, "0002")

    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT created_at, completed_at, finish_reason, latency_ms, status FROM judgments")
        ).one()
    assert row.completed_at == row.created_at
    assert row.finish_reason == ""
    assert row.latency_ms == 0
    assert row.status == "started"
    assert child_row_counts(engine) == (1, 1)


def index_names(engine: Engine, table: str) -> set[str]:
    return {index["name"] for index in inspect(engine).get_indexes(table)}


def test_query_index_migration_downgrades(engine):
    upgrade_database(engine)

    migrate(engine, command.downgrade, "0004")

    assert "ix_verdicts_constraint_passed" in index_names(engine, "verdicts")
    assert "ix_verdicts_constraint_passed_judgment_id" not in index_names(engine, "verdicts")
    assert "ix_judgments_model_name_created_at" not in index_names(engine, "judgments")
    assert "ix_judgments_heads_name_created_at" not in index_names(engine, "judgments")


def test_tenant_migration_keeps_judgments_in_default(engine):
    migrate(engine, command.upgrade, "0005")
    with engine.begin() as connection:
        insert_judgment(connection, "01a2435b-0000-7000-8000-000000000001")

    upgrade_database(engine)

    with engine.connect() as connection:
        tenants = connection.execute(text("SELECT tenant FROM judgments")).scalars().all()
    assert tenants == ["default"]
    assert "ix_judgments_tenant_created_at" in index_names(engine, "judgments")


def test_tenant_migration_downgrades(engine):
    upgrade_database(engine)

    migrate(engine, command.downgrade, "0005")

    assert "api_keys" not in table_names(engine)
    assert "tenant" not in {column["name"] for column in inspect(engine).get_columns("judgments")}
    assert "ix_judgments_tenant_created_at" not in index_names(engine, "judgments")


def test_upgrade_skips_newer_release_database(engine, caplog):
    upgrade_database(engine)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))

    upgrade_database(engine)

    assert database_revision(engine) == "0099"
    assert "which this release does not know" in caplog.text


def test_replicas_upgrading_at_once_take_turns(postgresql_engine):
    """Replicas that start together each run the upgrade; the advisory lock lets one migrate, the rest find head."""
    # Without the lock the upgrades wait on each other's table locks for good. lock_timeout turns that
    # wait into an error, so a regression fails here instead of hanging.
    url = postgresql_engine.url
    url = url.update_query_dict({"options": f"{url.query['options']} -clock_timeout=30s"})
    engine = create_engine_for(url.render_as_string(hide_password=False))
    start = threading.Barrier(4)

    def upgrade() -> None:
        start.wait()
        upgrade_database(engine)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for future in [pool.submit(upgrade) for _ in range(4)]:
                future.result()
    finally:
        engine.dispose()

    assert database_revision(postgresql_engine) == head_revision()
    assert table_names(postgresql_engine) == STORE_TABLES | {"alembic_version"}
