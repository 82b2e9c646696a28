"""Request ids on responses and in log records, JSON logs, health and readiness, metrics, proxy headers."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text

from server.app import create_app
from server.errors import QueueFullError
from server.observability import JsonFormatter, RequestContextFilter, request_id_var
from server.settings import Settings
from server.store import head_revision
from tests.conftest import CONSTRAINTS
from tests.server.helpers import MAX_TOKENS_LIMIT, PROMPT, assert_error, make_app

REQUEST_ID = "gateway-req-42"


@pytest.fixture
def app(tmp_path, tiny_model) -> FastAPI:
    return make_app(tmp_path, tiny_model)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def generate(client: TestClient, **headers: str):
    return client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 4, "seed": 1}, headers=headers)


# Request ids

def test_request_id_round_trip(client):
    response = generate(client, **{"X-Request-ID": REQUEST_ID})

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == REQUEST_ID
    stored = client.get(f"/v1/judgments/{response.json()['id']}").json()
    assert stored["request_id"] == REQUEST_ID


def test_request_id_made_when_malformed(client):
    response = generate(client, **{"X-Request-ID": "bad id with spaces"})

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] != "bad id with spaces"
    assert len(response.headers["X-Request-ID"]) == 32


def test_request_id_on_404_and_422(client):
    not_found = client.get("/v1/nothing-here", headers={"X-Request-ID": REQUEST_ID})
    invalid = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": -1},
                          headers={"X-Request-ID": REQUEST_ID})

    assert not_found.status_code == 404
    assert not_found.headers["X-Request-ID"] == REQUEST_ID
    assert_error(invalid, 422, param="max_tokens", code="invalid_value")
    assert invalid.headers["X-Request-ID"] == REQUEST_ID


def test_request_id_on_429(app, client, monkeypatch):
    def full_queue(*args, **kwargs):
        raise QueueFullError(1, 3)

    monkeypatch.setattr(app.state.runtime.worker, "_enqueue", full_queue)
    response = generate(client, **{"X-Request-ID": REQUEST_ID})

    assert_error(response, 429, type="rate_limit_error", code="queue_full")
    assert response.headers["X-Request-ID"] == REQUEST_ID


def test_request_id_on_500(app, client, monkeypatch, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("worker exploded")

    monkeypatch.setattr(app.state.runtime.worker, "generate", broken)
    caplog.handler.addFilter(RequestContextFilter())
    with caplog.at_level(logging.ERROR, logger="server.errors"):
        response = generate(client, **{"X-Request-ID": REQUEST_ID})

    assert_error(response, 500, type="server_error", code="internal_error")
    assert response.headers["X-Request-ID"] == REQUEST_ID
    unhandled = [record for record in caplog.records if record.name == "server.errors"]
    assert unhandled
    assert unhandled[0].request_id == REQUEST_ID


def test_log_records_carry_request_id(client, caplog):
    caplog.handler.addFilter(RequestContextFilter())
    with caplog.at_level(logging.INFO):
        response = generate(client, **{"X-Request-ID": REQUEST_ID})
    assert response.status_code == 200

    by_logger = {record.name: record for record in caplog.records}
    assert by_logger["server.worker"].request_id == REQUEST_ID  # logged on the worker thread
    assert by_logger["server.generation"].request_id == REQUEST_ID
    assert by_logger["server.generation"].judgment_id == response.json()["id"]


def test_log_records_of_streams_carry_request_id(client, caplog):
    caplog.handler.addFilter(RequestContextFilter())
    with caplog.at_level(logging.INFO):
        with client.stream("POST", "/v1/generate", headers={"X-Request-ID": REQUEST_ID},
                           json={"prompt": PROMPT, "max_tokens": 3, "stream": True}) as response:
            response.read()
    assert response.headers["X-Request-ID"] == REQUEST_ID

    generation_records = [record for record in caplog.records if record.name == "server.generation"]
    assert len(generation_records) == 2  # started, then completed
    assert all(record.request_id == REQUEST_ID for record in generation_records)


# JSON logs

def test_json_log_line_shape():
    record = logging.LogRecord("server.worker", logging.INFO, __file__, 1, "Request %s: %d tokens",
                               ("r1", 3), None)
    token = request_id_var.set("r1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)

    assert set(line) == {"time", "level", "logger", "message", "request_id"}
    assert line["level"] == "INFO"
    assert line["logger"] == "server.worker"
    assert line["message"] == "Request r1: 3 tokens"
    assert line["request_id"] == "r1"
    assert line["time"].endswith("+00:00")


def test_json_log_prefers_record_attribute():
    record = logging.LogRecord("server.worker", logging.INFO, __file__, 1, "done", (), None)
    record.request_id, record.judgment_id = "from-extra", "judgment-1"
    token = request_id_var.set("from-context")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)

    assert line["request_id"] == "from-extra"
    assert line["judgment_id"] == "judgment-1"


def test_json_logs_of_request_hide_secrets_and_text(client):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        response = generate(client, **{"X-Request-ID": REQUEST_ID, "Authorization": "Bearer sk-secret-value-123",
                                       "X-API-Key": "key-secret-value-456"})
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert response.status_code == 200

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines
    committed = [line for line in lines if line["logger"] == "server.generation"]
    assert committed[0]["request_id"] == REQUEST_ID
    assert committed[0]["judgment_id"] == response.json()["id"]
    output = stream.getvalue()
    assert "sk-secret-value-123" not in output
    assert "key-secret-value-456" not in output
    assert PROMPT not in output  # prompts are logged at DEBUG only


# Health

def test_healthz(client):
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_ok(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"model": "ok", "database": "ok", "migrations": "ok"}}


def test_readyz_database_unreachable(app, client, tmp_path):
    runtime = app.state.runtime
    working_engine = runtime.engine
    runtime.engine = create_engine(f"sqlite:///{tmp_path / 'missing-dir' / 'gone.db'}")
    try:
        response = client.get("/readyz")
    finally:
        runtime.engine = working_engine

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["model"] == "ok"
    assert body["checks"]["database"].startswith("unreachable: OperationalError")
    assert body["checks"]["migrations"] == "not checked: the database is unreachable"


def test_readyz_migrations_behind(app, client):
    with app.state.runtime.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0005'"))

    response = client.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["migrations"] == (f"behind: the database is at revision 0005, the server needs {head_revision()}; "
                                    "run `tracehead db upgrade`")


def test_readyz_ready_on_newer_schema(app, client):
    """During a rolling upgrade the first new replica migrates; the old ones must keep serving."""
    with app.state.runtime.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))

    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json()["checks"]["migrations"] == (
        f"ok: the database is at revision 0099, newer than this server's {head_revision()}")


# Metrics

def read_metrics(client: TestClient) -> dict[str, list]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def sample_value(samples: list, name: str, **labels: str) -> float:
    matches = [sample.value for sample in samples if sample.name == name and labels.items() <= sample.labels.items()]
    assert len(matches) == 1, (name, labels, samples)
    return matches[0]


def test_metrics_after_generations(client):
    for seed in range(3):
        assert client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 4, "seed": seed}).status_code == 200
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 4, "stream": True}) as stream:
        stream.read()
    assert client.get("/v1/nothing-here").status_code == 404

    metrics = read_metrics(client)

    requests = metrics["tracehead_http_requests"]
    assert sample_value(requests, "tracehead_http_requests_total", route="/v1/generate", status="200") == 4
    assert sample_value(requests, "tracehead_http_requests_total", route="unmatched", status="404") == 1
    assert sample_value(metrics["tracehead_generated_tokens"], "tracehead_generated_tokens_total") == 16
    first_token = metrics["tracehead_time_to_first_token_seconds"]
    assert sample_value(first_token, "tracehead_time_to_first_token_seconds_count") == 4
    assert sample_value(first_token, "tracehead_time_to_first_token_seconds_sum") > 0
    inter_token = metrics["tracehead_inter_token_latency_seconds"]
    assert sample_value(inter_token, "tracehead_inter_token_latency_seconds_count") == 4 * 3
    end_to_end = metrics["tracehead_end_to_end_latency_seconds"]
    assert sample_value(end_to_end, "tracehead_end_to_end_latency_seconds_count", kind="generation") == 4
    assert sample_value(metrics["tracehead_queue_depth"], "tracehead_queue_depth") == 0
    assert sample_value(metrics["tracehead_running_batch_size"], "tracehead_running_batch_size") == 0

    verdicts = metrics["tracehead_verdicts"]
    totals = [sample for sample in verdicts if sample.name == "tracehead_verdicts_total"]
    assert {sample.labels["result"] for sample in totals} <= {"passed", "failed"}
    for constraint in CONSTRAINTS:
        # One verdict per constraint and judgment, passed or failed: four judgments in all.
        assert sum(sample.value for sample in totals if sample.labels["constraint"] == constraint) == 4

    writes = metrics["tracehead_audit_write_seconds"]
    assert sample_value(writes, "tracehead_audit_write_seconds_count", operation="save") == 3
    assert sample_value(writes, "tracehead_audit_write_seconds_count", operation="start") == 1
    assert sample_value(writes, "tracehead_audit_write_seconds_count", operation="finish") == 1
    assert not [s for s in metrics["tracehead_audit_write_failures"] if s.name.endswith("_total")]


def test_metrics_count_audit_write_failures(app, client, monkeypatch):
    def failing_save(record):
        raise RuntimeError("disk full")

    monkeypatch.setattr(app.state.runtime.store, "save", failing_save)
    assert generate(client).status_code == 500

    failures = read_metrics(client)["tracehead_audit_write_failures"]
    assert sample_value(failures, "tracehead_audit_write_failures_total", operation="save") == 1


def test_metrics_registry_per_app(tmp_path, tiny_model):
    with TestClient(make_app(tmp_path / "a", tiny_model)) as first:
        generate(first)
    with TestClient(make_app(tmp_path / "b", tiny_model)) as second:
        metrics = read_metrics(second)

    assert not [s for s in metrics["tracehead_generated_tokens"] if s.name.endswith("_total") and s.value]


# Proxies and root_path

def proxy_app(tmp_path, tiny_model, **settings) -> FastAPI:
    app = create_app(Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT, **settings), tiny_model)

    @app.get("/test/peer")
    async def peer(request: Request) -> dict:
        return {"client": request.client.host, "scheme": request.url.scheme, "root_path": request.scope["root_path"],
                "judgments_url": str(request.url_for("list_judgments"))}

    return app


FORWARDED = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/tracehead"}


def test_forwarded_headers_from_trusted_proxy(tmp_path, tiny_model):
    app = proxy_app(tmp_path, tiny_model, trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("10.1.2.3", 5000)) as client:
        body = client.get("/test/peer", headers=FORWARDED).json()

    assert body["client"] == "203.0.113.9"
    assert body["scheme"] == "https"
    assert body["root_path"] == "/tracehead"
    assert body["judgments_url"] == "https://testserver/tracehead/v1/judgments"


def test_forwarded_headers_from_untrusted_peer(tmp_path, tiny_model):
    app = proxy_app(tmp_path, tiny_model, trusted_proxies=["10.0.0.0/8"])
    with TestClient(app, client=("192.0.2.7", 5000)) as client:
        body = client.get("/test/peer", headers=FORWARDED).json()

    assert body["client"] == "192.0.2.7"
    assert body["scheme"] == "http"
    assert body["root_path"] == ""


def test_forwarded_headers_ignored_by_default(tmp_path, tiny_model):
    app = proxy_app(tmp_path, tiny_model)
    with TestClient(app, client=("127.0.0.1", 5000)) as client:
        body = client.get("/test/peer", headers=FORWARDED).json()

    assert body["client"] == "127.0.0.1"
    assert body["scheme"] == "http"
    assert body["root_path"] == ""


def test_root_path_setting(tmp_path, tiny_model):
    app = proxy_app(tmp_path, tiny_model, root_path="/tracehead")
    with TestClient(app) as client:
        prefixed = client.get("/tracehead/healthz")
        body = client.get("/tracehead/test/peer").json()
        openapi = client.get("/tracehead/openapi.json").json()

    assert prefixed.status_code == 200
    assert body["root_path"] == "/tracehead"
    assert body["judgments_url"] == "http://testserver/tracehead/v1/judgments"
    assert openapi["servers"] == [{"url": "/tracehead"}]


@pytest.mark.parametrize("entry", ["10.0.0.300", "proxy.internal", "10.0.0.0/33"])
def test_trusted_proxies_rejects_invalid(entry):
    with pytest.raises(ValueError, match="not an IP address or CIDR network"):
        Settings(trusted_proxies=[entry])


@pytest.mark.parametrize("value", ["tracehead", "/tracehead/"])
def test_root_path_rejects_invalid(value):
    with pytest.raises(ValueError, match="root_path must start with /"):
        Settings(root_path=value)
