"""Engine setup and schema migrations for the audit store."""

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError as AlembicError
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

import migrations

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

# busy_timeout is in milliseconds: a writer waits this long for another
# connection's write lock before SQLite raises "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 5000
# PostgreSQL compresses a value of more than about 2 kB (a 64-token trace is
# about 50 kB) before it stores it. Inserting such traces 16 at a time took the
# server 1.5 ms per trace with its default method, pglz, and 0.45 ms with lz4
# (PostgreSQL 15 on a 2-core VM). Reads decompress either method.
POSTGRESQL_TOAST_COMPRESSION = "lz4"
# Key of the PostgreSQL advisory lock that serialises migrations; any constant that
# no other lock user picks ("th" in ASCII).
MIGRATION_LOCK_KEY = 0x7468


def create_engine_for(url: str) -> Engine:
    """Create an engine for ``url``, with durable settings on SQLite.

    For a SQLite file the parent directory is created first. Every SQLite
    connection gets WAL journaling, synchronous=FULL, enforced foreign keys
    and a busy timeout. With FULL, SQLite syncs the WAL file at every commit,
    so a committed judgment survives a killed process and an OS crash. Every
    PostgreSQL connection compresses large values with lz4 where the server
    supports it.
    """
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
        _writable_directory(Path(parsed.database).expanduser().parent)

    # hide_parameters keeps prompts and outputs out of error messages and logs.
    engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    if is_sqlite:
        event.listen(engine, "connect", _set_sqlite_pragmas)
    elif parsed.get_backend_name() == "postgresql":
        event.listen(engine, "connect", partial(_set_postgresql_compression, engine.dialect.dbapi.Error))
    return engine


def _writable_directory(directory: Path) -> None:
    """Create ``directory`` if missing; raise a RuntimeError that names it when this process cannot write there.

    SQLite itself reports only "unable to open database file", which names neither
    the directory nor the user, the two things to fix (a container volume owned by
    another uid, say).
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        pass
    if not os.access(directory, os.W_OK | os.X_OK):
        raise RuntimeError(
            f"the SQLite audit store's directory {directory} is missing or not writable by this process "
            f"(uid {os.getuid()}); make it writable (for a container volume: chown it to that uid), or set "
            "TRACEHEAD_DATA_DIR or TRACEHEAD_DATABASE_URL elsewhere")


def _set_sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout goes first, because switching to WAL needs a lock.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _set_postgresql_compression(driver_error: type[Exception], dbapi_connection: Any,
                                connection_record: Any) -> None:
    """Make new values of this connection compress with lz4, or keep pglz where the server lacks lz4.

    lz4 needs PostgreSQL 14 or later, built with lz4 support.
    """
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET default_toast_compression = '{POSTGRESQL_TOAST_COMPRESSION}'")
        dbapi_connection.commit()
    except driver_error as exc:
        dbapi_connection.rollback()
        logger.warning("PostgreSQL rejected default_toast_compression=%s, so large values are compressed with "
                       "its default method, which is slower: %s", POSTGRESQL_TOAST_COMPRESSION,
                       str(exc).partition("\n")[0])


def _alembic_config() -> Config:
    config = Config()
    # configparser treats "%" as interpolation, so a literal one is doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def upgrade_database(engine: Engine) -> None:
    """Apply all pending Alembic revisions to the database of ``engine``.

    A database at a revision this server does not know was migrated by a newer
    release: during a rolling upgrade the older replicas keep serving on it, so
    it is left alone with a warning.
    """
    current, head = database_revision(engine), head_revision()
    if current == head:
        logger.info("database schema is at revision %s", head)
        return
    if is_newer_revision(current):
        logger.warning("database schema is at revision %s, which this release does not know (its newest is %s); "
                       "leaving it as it is, as a newer release migrated it", current, head)
        return
    logger.info("upgrading database schema from revision %s to %s", current, head)
    run_migrations(engine, command.upgrade, "head")
    logger.info("database schema is at revision %s", database_revision(engine))


def run_migrations(engine: Engine, action: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic command such as ``command.upgrade`` to ``revision`` in one transaction."""
    config = _alembic_config()
    with engine.connect() as connection, sqlite_foreign_keys_off(connection):
        with connection.begin():
            if connection.dialect.name == "postgresql":
                # Replicas that start together would each run the same migration. The lock, held until the
                # transaction ends, makes them take turns, so a replica that waited finds the schema at head.
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            config.attributes["connection"] = connection
            action(config, revision)


@contextmanager
def sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, turn foreign keys off for a migration, then check them and turn them back on.

    Batch mode copies a table and drops the old one; with foreign keys on, the
    drop would cascade and delete every verdict and trace. SQLite ignores the
    pragma inside a transaction, so the block must begin and end its own.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.commit()
    try:
        yield
    finally:
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        connection.exec_driver_sql("PRAGMA foreign_keys=ON")
        connection.commit()
    if broken:
        raise RuntimeError(f"the migration left {len(broken)} rows whose foreign key points nowhere; first: {broken[0]}")


def database_revision(engine: Engine) -> str | None:
    """Return the Alembic revision of the database, or None if it has none yet."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def is_newer_revision(revision: str | None) -> bool:
    """Return whether ``revision`` is missing from this release's migrations, so a newer release wrote it."""
    if revision is None:
        return False
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is None
    except AlembicError:
        return True


def head_revision() -> str:
    """Return the newest Alembic revision in ``migrations/versions``."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no Alembic revision found in {MIGRATIONS_DIR / 'versions'}")
    return head
