"""Engines for the store tests: an empty database on SQLite and on PostgreSQL.

The PostgreSQL cases use TRACEHEAD_TEST_POSTGRES_URL, or DEFAULT_POSTGRES_URL
when it is unset. They are skipped when that server cannot be reached, unless
the CI variable is set. CI machines run PostgreSQL, so there the tests fail instead.
Each PostgreSQL test gets a schema of its own, so runs that share a database
do not see each other's tables.
"""

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from server.store import create_engine_for

POSTGRES_URL_VARIABLE = "TRACEHEAD_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Seconds libpq waits for the server before giving up, so an absent server fails fast.
CONNECT_TIMEOUT_S = 3


def postgres_url_with(url: str, **connect_args: str) -> str:
    """Return ``url`` with libpq connection parameters added to its query string.

    SQLAlchemy's psycopg dialect passes the query string to psycopg.connect,
    so these act as connect_args for create_engine_for, which takes only a URL.
    """
    parameters = {"connect_timeout": str(CONNECT_TIMEOUT_S), **connect_args}
    return make_url(url).update_query_dict(parameters).render_as_string(hide_password=False)


def check_connection(url: str) -> None:
    """Connect to ``url`` and run one query. Errors from the driver or SQLAlchemy propagate."""
    engine = create_engine_for(postgres_url_with(url))
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def describe_error(exc: Exception) -> str:
    """Return the driver's error class and the first line of its message."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    first_line = str(cause).partition("\n")[0]
    return f"{type(cause).__name__}: {first_line}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The URL of a reachable PostgreSQL database, probed once per session.

    Raises the skip (or, with CI set, the failure) once, and pytest repeats it
    for every test that uses the fixture.
    """
    url = os.environ.get(POSTGRES_URL_VARIABLE) or DEFAULT_POSTGRES_URL
    shown_url = make_url(url).render_as_string(hide_password=True)
    try:
        check_connection(url)
    except (SQLAlchemyError, ImportError) as exc:
        error = describe_error(exc)
        if os.environ.get("CI"):
            pytest.fail(
                f"PostgreSQL at {shown_url} is unreachable ({error}), and CI is set, "
                f"so the PostgreSQL store tests must run. Start PostgreSQL or set {POSTGRES_URL_VARIABLE}."
            )
        pytest.skip(
            f"PostgreSQL at {shown_url} is unreachable ({error}). To run these cases, "
            f"start PostgreSQL there or set {POSTGRES_URL_VARIABLE} to a database this user may create schemas in."
        )
    return url


@pytest.fixture
def postgresql_engine(postgres_url: str) -> Iterator[Engine]:
    """An engine whose connections see only a new, empty schema, dropped with its tables afterwards."""
    schema = f"tracehead_test_{secrets.token_hex(8)}"
    admin = create_engine_for(postgres_url_with(postgres_url))
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    # With the schema alone on search_path, unqualified names (the store's tables,
    # alembic_version) resolve there. PostgreSQL searches pg_catalog implicitly.
    engine = create_engine_for(postgres_url_with(postgres_url, options=f"-csearch_path={schema}"))
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sqlite_engine(tmp_path) -> Iterator[Engine]:
    """An engine on a new SQLite file in a directory that does not exist yet."""
    engine = create_engine_for(f"sqlite:///{tmp_path / 'audit' / 'store.db'}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request) -> Engine:
    """An engine on an empty database, once per backend."""
    return request.getfixturevalue(f"{request.param}_engine")
