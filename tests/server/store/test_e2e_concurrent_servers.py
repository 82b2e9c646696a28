"""Two server processes on the real default model, writing to one PostgreSQL log at once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, func, select

from server.store import upgrade_database
from server.store.audit_log import IntegrityLog
from server.store.tables import Judgment
from tests.server.helpers import free_port, start_server

pytestmark = pytest.mark.e2e

# Requests per server, and how many each server has in flight at once.
REQUESTS_PER_SERVER, CLIENTS_PER_SERVER = 24, 4


def generate(url: str, number: int) -> int:
    body = {"prompt": f"Count to {number}:", "max_tokens": 4, "seed": number}
    return httpx.post(f"{url}/v1/generate", json=body, timeout=120).status_code


def test_two_servers_write_one_log(default_model_path, postgresql_engine: Engine, tmp_path):
    upgrade_database(postgresql_engine)
    url = postgresql_engine.url.render_as_string(hide_password=False)
    ports = [free_port(), free_port()]
    for port in ports:
        (tmp_path / f"server-{port}").mkdir()
    servers = [start_server(tmp_path / f"server-{port}", port, TRACEHEAD_DATABASE_URL=url,
                            TRACEHEAD_SIGNING_KEY_FILE=str(tmp_path / "signing-key.pem")) for port in ports]
    try:
        with ThreadPoolExecutor(len(ports) * CLIENTS_PER_SERVER) as pool:
            statuses = list(pool.map(generate, [f"http://127.0.0.1:{port}" for port in ports] * REQUESTS_PER_SERVER,
                                     range(len(ports) * REQUESTS_PER_SERVER)))
    finally:
        for server in servers:
            server.kill()
            server.wait()

    assert statuses == [200] * (len(ports) * REQUESTS_PER_SERVER)
    report = IntegrityLog(postgresql_engine, None).verify()
    assert report.ok, report.mismatches
    with postgresql_engine.connect() as connection:
        judgments = connection.execute(select(func.count()).select_from(Judgment)).scalar_one()
    assert report.leaves == judgments == len(ports) * REQUESTS_PER_SERVER
