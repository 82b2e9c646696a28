from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from server.store import create_engine_for, database_revision, head_revision, upgrade_database
from server.store.db import _alembic_config
from server.store.tables import Base

STORE_TABLES = {"judgments", "verdicts", "traces"}


def make_engine(tmp_path) -> Engine:
    return create_engine_for(f"sqlite:///{tmp_path / 'store.db'}")


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def migrate(engine: Engine, direction, revision: str) -> None:
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        direction(config, revision)


def downgrade_to_base(engine: Engine) -> None:
    migrate(engine, command.downgrade, "base")


def test_head_revision_is_latest():
    assert head_revision() == "0002"


def test_new_database_has_no_revision(tmp_path):
    engine = make_engine(tmp_path)

    assert database_revision(engine) is None
    assert table_names(engine) == set()


def test_upgrade_creates_tables(tmp_path):
    engine = make_engine(tmp_path)

    upgrade_database(engine)

    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == head_revision()


def test_upgrade_twice_is_noop(tmp_path):
    engine = make_engine(tmp_path)

    upgrade_database(engine)
    upgrade_database(engine)

    assert database_revision(engine) == head_revision()


def test_upgrade_creates_named_indexes(tmp_path):
    engine = make_engine(tmp_path)
    upgrade_database(engine)
    inspector = inspect(engine)

    judgment_indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("judgments")}
    verdict_indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("verdicts")}
    assert judgment_indexes == {
        "ix_judgments_created_at": ["created_at"],
        "ix_judgments_flagged_created_at": ["flagged", "created_at"],
        "ix_judgments_kind_created_at": ["kind", "created_at"],
    }
    assert verdict_indexes == {
        "ix_verdicts_constraint_score": ["constraint", "score"],
        "ix_verdicts_constraint_passed": ["constraint", "passed"],
    }
    assert inspector.get_pk_constraint("verdicts")["constrained_columns"] == ["judgment_id", "constraint"]


def test_foreign_keys_declare_cascade(tmp_path):
    engine = make_engine(tmp_path)
    upgrade_database(engine)
    inspector = inspect(engine)

    for table in ("verdicts", "traces"):
        [foreign_key] = inspector.get_foreign_keys(table)
        assert foreign_key["name"] == f"fk_{table}_judgment_id_judgments"
        assert foreign_key["referred_table"] == "judgments"
        assert foreign_key["options"]["ondelete"] == "CASCADE"


def test_migration_matches_table_metadata(tmp_path):
    engine = make_engine(tmp_path)
    upgrade_database(engine)

    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)

    assert differences == []


def test_downgrade_then_upgrade_again(tmp_path):
    engine = make_engine(tmp_path)
    upgrade_database(engine)

    downgrade_to_base(engine)

    assert table_names(engine) == {"alembic_version"}
    assert database_revision(engine) is None

    upgrade_database(engine)

    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == head_revision()


def test_env_connects_from_url(tmp_path):
    database = tmp_path / "from_url.db"
    config = _alembic_config()
    config.set_main_option("sqlalchemy.url", f"sqlite:///{database}")

    command.upgrade(config, "head")

    engine = create_engine_for(f"sqlite:///{database}")
    assert table_names(engine) == STORE_TABLES | {"alembic_version"}
    assert database_revision(engine) == "0002"


def test_kind_migration_keeps_old_rows(tmp_path):
    engine = make_engine(tmp_path)
    migrate(engine, command.upgrade, "0001")
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO judgments (id, created_at, completed_at, request_id, model_name, model_fingerprint, "
            "heads_name, heads_fingerprint, prompt, output, parameters, finish_reason, status, prompt_tokens, "
            "completion_tokens, latency_ms, flagged, metadata) VALUES ('old', '2026-01-01 00:00:00', "
            "'2026-01-01 00:00:01', 'r', 'm', 'f', 'h', 'g', '{}', 'text', '{}', 'stop', 'completed', 1, 1, 1.0, 0, '{}')")

    upgrade_database(engine)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT kind FROM judgments WHERE id = 'old'").scalar_one() == "generation"

    migrate(engine, command.downgrade, "0001")
    columns = {column["name"] for column in inspect(engine).get_columns("judgments")}
    assert "kind" not in columns
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT output FROM judgments WHERE id = 'old'").scalar_one() == "text"
