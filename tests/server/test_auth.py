"""API keys, scopes, tenants, gateway identity and the per-key concurrency limit, over HTTP on the tiny model."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.cli import main
from server.settings import Settings
from server.store import create_engine_for, upgrade_database
from server.store.keys import AUDIT_ADMIN_SCOPE, AUDIT_READ_SCOPE, GENERATE_SCOPE, SCOPES, KeyStore
from tests.server.helpers import MAX_TOKENS_LIMIT, PROMPT, assert_error
from tests.server.test_streaming import LONG_MAX_TOKENS, live_server, read_until_tokens  # noqa: F401

# Routes that need no key: health and metrics, and the OpenAPI document and docs that FastAPI serves.
OPEN_PATHS = {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}

# The scope each route needs, and a request that returns 200 when the key has that scope.
ROUTES = {
    ("POST", "/v1/generate"): (GENERATE_SCOPE, {"json": {"prompt": PROMPT, "max_tokens": 2}}),
    ("POST", "/v1/score"): (GENERATE_SCOPE, {"json": {"prompt": PROMPT, "response": " Paris."}}),
    ("POST", "/v1/chat/completions"): (GENERATE_SCOPE, {"json": {
        "model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}}),
    ("POST", "/v1/completions"): (GENERATE_SCOPE, {"json": {"model": "tiny-llama", "prompt": PROMPT,
                                                            "max_tokens": 2}}),
    ("GET", "/v1/models"): (GENERATE_SCOPE, {}),
    ("GET", "/v1/models/{model_id}"): (GENERATE_SCOPE, {}),
    ("GET", "/v1/judgments"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/judgments/export"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/judgments/stats"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/judgments/{judgment_id}"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/judgments/{judgment_id}/proof"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/judgments/{judgment_id}/verification"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/audit/public-key"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/audit/tree-head"): (AUDIT_READ_SCOPE, {}),
    ("GET", "/v1/audit/consistency"): (AUDIT_READ_SCOPE, {"params": {"first": 1, "second": 1}}),
    ("POST", "/v1/admin/judgments/{judgment_id}/erase"): (AUDIT_ADMIN_SCOPE, {"json": {
        "reason": "test", "erased_by": "tests"}}),
}
CREDENTIALS = ["none", "unknown", "revoked", *SCOPES]


def keyed_settings(data_dir, **overrides) -> Settings:
    return Settings(data_dir=data_dir, max_tokens_limit=MAX_TOKENS_LIMIT, auth="keys", **overrides)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, tiny_model) -> Iterator[tuple[TestClient, dict[str, dict], str]]:
    """A keyed server with one judgment of tenant "acme", and the headers of each credential in CREDENTIALS."""
    with TestClient(create_app(keyed_settings(tmp_path_factory.mktemp("matrix")), tiny_model)) as client:
        keys: KeyStore = client.app.state.runtime.keys
        headers = {"none": {}, "unknown": bearer("th_not-a-key-of-this-server")}
        for scope in SCOPES:
            headers[scope] = bearer(keys.create(f"only-{scope}", "acme", [scope])[1])
        revoked, secret = keys.create("revoked", "acme", list(SCOPES))
        keys.revoke(revoked.id)
        headers["revoked"] = bearer(secret)
        response = client.post("/v1/generate", headers=headers[GENERATE_SCOPE], json={"prompt": PROMPT,
                                                                                      "max_tokens": 2})
        assert response.status_code == 200, response.text
        yield client, headers, response.json()["id"]


def test_route_table_covers_every_route(matrix):
    client, _, _ = matrix
    served = {(method.upper(), path) for path, operations in client.app.openapi()["paths"].items()
              for method in operations}

    assert {route for route in served if route[1] not in OPEN_PATHS} == set(ROUTES)


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("route", list(ROUTES), ids=" ".join)
def test_route_checks_scope(matrix, route, credential):
    client, headers, judgment_id = matrix
    method, path = route
    scope, request = ROUTES[route]
    url = path.format(judgment_id=judgment_id, model_id="tiny-llama")

    response = client.request(method, url, headers=headers[credential], **request)

    if credential in ("none", "unknown", "revoked"):
        code = {"none": "missing_api_key", "unknown": "invalid_api_key", "revoked": "revoked_api_key"}[credential]
        assert_error(response, 401, type="authentication_error", code=code)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    elif credential == scope:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, 403, type="permission_error", code="missing_scope", fragments=(scope,))


def test_x_api_key_header_is_accepted(matrix):
    client, headers, _ = matrix
    secret = headers[GENERATE_SCOPE]["Authorization"].removeprefix("Bearer ")

    assert client.get("/v1/models", headers={"X-API-Key": secret}).status_code == 200


# Tenants

@pytest.fixture
def tenants(tmp_path, tiny_model) -> Iterator[tuple[TestClient, dict[str, dict[str, dict]]]]:
    """A keyed server with keys for tenants a and b: generate, audit:read and audit:admin each."""
    with TestClient(create_app(keyed_settings(tmp_path), tiny_model)) as client:
        keys: KeyStore = client.app.state.runtime.keys
        headers = {tenant: {scope: bearer(keys.create(f"{tenant}-{scope}", tenant, [scope])[1]) for scope in SCOPES}
                   for tenant in ("a", "b")}
        yield client, headers


def generate_as(client: TestClient, headers: dict) -> str:
    response = client.post("/v1/generate", headers=headers, json={"prompt": PROMPT, "max_tokens": 2})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_judgment_belongs_to_key_tenant(tenants):
    client, headers = tenants

    judgment_id = generate_as(client, headers["b"][GENERATE_SCOPE])

    assert client.app.state.runtime.store.get(judgment_id).tenant == "b"


def test_other_tenant_judgment_is_not_found(tenants):
    client, headers = tenants
    theirs = generate_as(client, headers["b"][GENERATE_SCOPE])
    reader, admin = headers["a"][AUDIT_READ_SCOPE], headers["a"][AUDIT_ADMIN_SCOPE]

    got = client.get(f"/v1/judgments/{theirs}", headers=reader)
    proof = client.get(f"/v1/judgments/{theirs}/proof", headers=reader)
    erase = client.post(f"/v1/admin/judgments/{theirs}/erase", headers=admin,
                        json={"reason": "test", "erased_by": "a"})

    assert_error(got, 404, type="not_found_error", param="judgment_id", code="judgment_not_found")
    assert_error(proof, 404, type="not_found_error", param="judgment_id", code="judgment_not_found")
    assert_error(erase, 404, type="not_found_error", param="judgment_id", code="judgment_not_found")
    unknown = client.get("/v1/judgments/01a2435b-0000-7000-8000-000000000000", headers=reader)
    assert got.json()["error"]["message"].replace(theirs, "ID") == unknown.json()["error"]["message"].replace(
        "01a2435b-0000-7000-8000-000000000000", "ID")
    own_read = client.get(f"/v1/judgments/{theirs}", headers=headers["b"][AUDIT_READ_SCOPE])
    assert own_read.status_code == 200, own_read.text
    assert "erasure" not in own_read.json()


def test_own_tenant_erase_succeeds(tenants):
    client, headers = tenants
    ours = generate_as(client, headers["a"][GENERATE_SCOPE])

    response = client.post(f"/v1/admin/judgments/{ours}/erase", headers=headers["a"][AUDIT_ADMIN_SCOPE],
                           json={"reason": "test", "erased_by": "a"})

    assert response.status_code == 200, response.text


def test_reads_list_only_own_tenant(tenants):
    client, headers = tenants
    ours = generate_as(client, headers["a"][GENERATE_SCOPE])
    theirs = generate_as(client, headers["b"][GENERATE_SCOPE])
    reader = headers["a"][AUDIT_READ_SCOPE]

    listed = [item["id"] for item in client.get("/v1/judgments", headers=reader).json()["data"]]
    exported = client.get("/v1/judgments/export", headers=reader).text
    stats = client.get("/v1/judgments/stats", headers=reader, params={"constraint": "causality"}).json()["data"]

    assert listed == [ours]
    assert ours in exported
    assert theirs not in exported
    assert sum(day["judgments"] for day in stats) == 1


# Gateway identity

GATEWAY_HEADERS = {"X-Consumer-ID": "billing", "X-Tenant-ID": "acme", "X-Consumer-Scopes": "generate, audit:read"}


def gateway_client(tmp_path, tiny_model, peer: str) -> TestClient:
    settings = keyed_settings(tmp_path, trusted_proxies=["10.0.0.0/8"])
    return TestClient(create_app(settings, tiny_model), client=(peer, 50000))


def test_trusted_gateway_identity_is_used(tmp_path, tiny_model):
    with gateway_client(tmp_path, tiny_model, "10.1.2.3") as client:
        judgment_id = generate_as(client, GATEWAY_HEADERS)
        erase = client.post(f"/v1/admin/judgments/{judgment_id}/erase", headers=GATEWAY_HEADERS,
                            json={"reason": "test", "erased_by": "gateway"})

        assert client.app.state.runtime.store.get(judgment_id).tenant == "acme"
        assert client.get(f"/v1/judgments/{judgment_id}", headers=GATEWAY_HEADERS).status_code == 200
    assert_error(erase, 403, type="permission_error", code="missing_scope", fragments=("audit:admin",))


def test_gateway_trust_uses_connection_peer(tmp_path, tiny_model):
    """Behind a gateway X-Forwarded-For names the caller, outside the trusted networks; the gateway connected."""
    forwarded = GATEWAY_HEADERS | {"X-Forwarded-For": "203.0.113.9"}
    with gateway_client(tmp_path, tiny_model, "10.1.2.3") as client:
        models = client.get("/v1/models", headers=forwarded)
    with gateway_client(tmp_path, tiny_model, "192.0.2.7") as client:
        spoofed = client.get("/v1/models", headers=GATEWAY_HEADERS | {"X-Forwarded-For": "10.1.2.3"})

    assert models.status_code == 200, models.text
    assert_error(spoofed, 401, type="authentication_error", code="missing_api_key")


def test_untrusted_peer_gateway_headers_are_ignored(tmp_path, tiny_model):
    with gateway_client(tmp_path, tiny_model, "192.0.2.7") as client:
        response = client.get("/v1/models", headers=GATEWAY_HEADERS)

    assert_error(response, 401, type="authentication_error", code="missing_api_key")


def test_gateway_without_tenant_is_rejected(tmp_path, tiny_model):
    headers = {"X-Consumer-ID": "billing", "X-Consumer-Scopes": "generate"}
    with gateway_client(tmp_path, tiny_model, "10.1.2.3") as client:
        response = client.get("/v1/models", headers=headers)

    assert_error(response, 401, type="authentication_error", code="invalid_gateway_identity",
                 fragments=("X-Tenant-ID",))


# Modes and start-up

def test_auth_none_acts_as_default_tenant(tmp_path, tiny_model, caplog):
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT)
    with caplog.at_level(logging.WARNING, logger="server.auth"), TestClient(create_app(settings, tiny_model)) as client:
        judgment_id = generate_as(client, {})

        assert client.app.state.runtime.store.get(judgment_id).tenant == "default"
    assert settings.auth == "none"
    assert any("TRACEHEAD_AUTH=none" in record.message for record in caplog.records)


def test_production_rejects_auth_none():
    with pytest.raises(ValidationError, match="TRACEHEAD_AUTH=none .* TRACEHEAD_MODE=production"):
        Settings(mode="production", auth="none")


def test_production_defaults_to_keys():
    assert Settings(mode="production").auth == "keys"


def test_keys_without_any_key_warns(tmp_path, tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="server.auth"), \
            TestClient(create_app(keyed_settings(tmp_path), tiny_model)):
        pass

    assert any("tracehead keys create" in record.message for record in caplog.records)


# Key lifecycle through the CLI

def run_cli(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def test_key_lifecycle_through_cli(tmp_path, tiny_model, capsys, monkeypatch):
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))

    created = run_cli(capsys, "keys", "create", "--name", "billing", "--tenant", "acme", "--scope", "generate",
                      "--scope", "audit:read")
    secret = created.split("secret (shown only now; store it safely): ")[1].strip()
    key_id = created.split()[2]
    listed = run_cli(capsys, "keys", "list")

    assert secret.startswith("th_")
    assert created.count(secret) == 1
    assert secret not in listed
    assert secret[:11] + "..." in listed
    assert "billing" in listed
    assert "acme" in listed
    assert "generate,audit:read" in listed
    with TestClient(create_app(keyed_settings(tmp_path), tiny_model)) as client:
        assert client.get("/v1/models", headers=bearer(secret)).status_code == 200
        revoked = run_cli(capsys, "keys", "revoke", key_id)
        assert_error(client.get("/v1/models", headers=bearer(secret)), 401, type="authentication_error",
                     code="revoked_api_key")
    assert revoked.startswith(f"revoked key {key_id} (billing) at ")
    assert secret not in revoked


def test_cli_revoke_unknown_key_fails(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))

    assert main(["keys", "revoke", "no-such-key"]) == 2
    assert "no API key has the id 'no-such-key'" in capsys.readouterr().err


# Per-key concurrency, through a real HTTP server

def test_key_over_concurrency_limit_gets_429(tmp_path, live_server):
    engine = create_engine_for(Settings(data_dir=tmp_path).resolved_database_url)
    upgrade_database(engine)
    secret = KeyStore(engine).create("busy", "acme", [GENERATE_SCOPE])[1]
    other = KeyStore(engine).create("other", "acme", [GENERATE_SCOPE])[1]
    engine.dispose()
    url = live_server(auth="keys", max_concurrent_per_key=1)

    with httpx.Client(base_url=url, timeout=30) as http:
        body = {"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/generate", json=body, headers=bearer(secret)) as response:
            lines = response.iter_lines()  # kept open: closing the iterator would close the connection
            read_until_tokens(lines, 1)
            second = http.get("/v1/models", headers=bearer(secret))
            other_key = http.get("/v1/models", headers=bearer(other))

    assert_error(second, 429, type="rate_limit_error", code="too_many_concurrent_requests", fragments=("1",))
    assert second.headers["Retry-After"] == "2"
    assert other_key.status_code == 200
