"""Streamed generations on the tiny model: native events, the record's life cycle, failures and disconnects."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import text

from server.app import create_app
from server.settings import Settings
from tests.server.helpers import MAX_TOKENS_LIMIT, PROMPT, assert_error, make_app, read_events

# Tokens asked for in the disconnect tests: far more than are read before disconnecting.
LONG_MAX_TOKENS = 30


@pytest.fixture
def client(tmp_path, tiny_model) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path, tiny_model)) as client:
        yield client


def stream_events(client, path: str, body: dict) -> list[tuple[str | None, str]]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read()
        return read_events(response)


def execute(client: TestClient, statement: str) -> None:
    with client.app.state.runtime.engine.begin() as connection:
        connection.execute(text(statement))


def fail_updates(client: TestClient) -> None:
    """Make every later UPDATE of a judgment fail in the database, as a full disk would; inserts still work."""
    execute(client, "CREATE TRIGGER fail_update BEFORE UPDATE ON judgments BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")


def test_native_stream_events(client):
    events = stream_events(client, "/v1/generate", {"prompt": PROMPT, "max_tokens": 8, "seed": 2, "stream": True})

    names = [name for name, _ in events]
    assert names[0] == "prompt"
    assert names[-1] == "judgment"
    assert set(names[1:-1]) == {"token"}
    prompt, *tokens, final = [json.loads(data) for _, data in events]
    record = client.get(f"/v1/judgments/{prompt['id']}").json()
    assert record["status"] == "completed"
    assert prompt["prompt_tokens"] == record["trace"]["prompt_tokens"]
    assert [token["token"] for token in tokens] == record["trace"]["output_tokens"]
    assert "".join(token["text"] for token in tokens) == record["text"] == final["text"]
    assert final["id"] == prompt["id"]
    assert final["created_at"] == record["created_at"]
    assert final["status"] == "completed"
    assert final["judgment"] == record["judgment"]
    assert final["seed"] == 2
    assert "trace" not in final


def test_native_stream_matches_unstreamed(client):
    body = {"prompt": PROMPT, "max_tokens": 8, "seed": 5, "temperature": 1.2}
    events = stream_events(client, "/v1/generate", body | {"stream": True, "include_trace": False})
    unstreamed = client.post("/v1/generate", json=body).json()

    tokens = [json.loads(data) for name, data in events if name == "token"]
    assert all(set(token) == {"text"} for token in tokens)
    final = json.loads(events[-1][1])
    assert final["text"] == unstreamed["text"]
    assert final["judgment"] == unstreamed["judgment"]


def test_native_stream_stop_policy(client):
    events = stream_events(client, "/v1/generate", {"prompt": PROMPT, "max_tokens": 8, "stream": True,
                                                    "policy": {"causality": {"min_score": 1.0, "action": "stop"}}})

    final = json.loads(events[-1][1])
    assert final["finish_reason"] == "constraint"
    assert final["usage"]["completion_tokens"] == 1
    assert final["judgment"]["policy"]["triggered"][0]["constraint"] == "causality"


def test_started_record_failure_is_503_with_nothing_streamed(client):
    execute(client, "CREATE TRIGGER fail_insert BEFORE INSERT ON judgments BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")

    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 4, "stream": True})

    assert_error(response, 503, type="service_unavailable", code="audit_store_unavailable")
    execute(client, "DROP TRIGGER fail_insert")
    # The queued generation was cancelled, so the worker is free for the next request.
    assert client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/chat/completions"])
def test_final_commit_failure_keeps_started(client, path):
    fail_updates(client)
    body = {"max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    if path != "/v1/generate":
        body["model"] = "tiny-llama"

    events = stream_events(client, path, body)

    name, data = events[-1]
    error = json.loads(data)["error"]
    assert error["code"] == "audit_store_unavailable"
    assert name == ("error" if path == "/v1/generate" else None)
    assert all(data != "[DONE]" for _, data in events)
    listed = client.get("/v1/judgments", params={"status": "started"}).json()["data"]
    assert len(listed) == 1
    assert listed[0]["finish_reason"] is None
    assert listed[0]["text"] == ""
    record = client.get(f"/v1/judgments/{listed[0]['id']}").json()
    assert record["status"] == "started"
    assert record["completed_at"] is None
    assert record["input"] == {"messages": [{"role": "user", "content": "Hi"}]}
    assert record["parameters"]["max_tokens"] == 4
    assert "trace" not in record
    assert client.get("/v1/judgments", params={"status": "completed"}).json()["data"] == []


# Disconnects, through a real HTTP server

@pytest.fixture
def live_server(tmp_path, slow_model) -> Iterator[Callable[..., str]]:
    """Serve the app on the slowed tiny model with uvicorn on a free port of 127.0.0.1; return its URL."""
    servers = []

    def serve(**settings) -> str:
        app = create_app(Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT, **settings), slow_model)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)
        return f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def wait_for_final_status(http: httpx.Client, judgment_id: str) -> dict:
    deadline = time.monotonic() + 10
    while (record := http.get(f"/v1/judgments/{judgment_id}").json())["status"] == "started":
        assert time.monotonic() < deadline, "the record stayed started for 10 s after the client disconnected"
        time.sleep(0.05)
    return record


def read_until_tokens(lines: Iterator[str], tokens: int) -> str:
    """Read a native stream's lines until ``tokens`` token events have arrived; return the judgment id.

    The caller keeps ``lines`` (the response's ``iter_lines()``): closing that iterator closes the connection.
    """
    judgment_id, seen, name = None, 0, None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name == "prompt":
            judgment_id = json.loads(line.removeprefix("data: "))["id"]
        elif line.startswith("data: ") and name == "token":
            seen += 1
            if seen == tokens:
                return judgment_id
    raise AssertionError(f"the stream ended after {seen} tokens")


def test_disconnect_cancels_record_and_frees_worker(live_server):
    with httpx.Client(base_url=live_server(), timeout=30) as http:
        body = {"prompt": PROMPT, "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/generate", json=body) as response:
            lines = response.iter_lines()
            judgment_id = read_until_tokens(lines, 2)
        # Leaving the block closes the connection mid-stream.

        record = wait_for_final_status(http, judgment_id)
        following = http.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
        cancelled = http.get("/v1/judgments", params={"status": "cancelled"}).json()["data"]

    assert record["status"] == "cancelled"
    assert record["finish_reason"] == "cancelled"
    # The worker stops within a step of noticing; a few tokens may be generated between reading and noticing.
    assert 2 <= record["usage"]["completion_tokens"] <= 5
    output_tokens = record["trace"]["output_tokens"]
    assert len(output_tokens) == record["usage"]["completion_tokens"]
    assert record["text"] == "".join(token["text"] for token in output_tokens)
    assert list(record["judgment"]["constraints"])
    assert record["completed_at"] is not None
    assert following.status_code == 200, following.text
    assert following.json()["usage"]["completion_tokens"] == 2
    assert [item["id"] for item in cancelled] == [judgment_id]


def test_slow_reader_gets_whole_stream(live_server):
    with httpx.Client(base_url=live_server(), timeout=30) as http:
        body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/generate", json=body) as response:
            lines = response.iter_lines()
            judgment_id = read_until_tokens(lines, 1)
            time.sleep(1.5)  # longer than the rest of the generation takes
            rest = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
        record = http.get(f"/v1/judgments/{judgment_id}").json()

    assert rest[-1]["status"] == "completed"
    assert record["status"] == "completed"
    assert record["usage"]["completion_tokens"] == 10


def test_full_queue_rejects_stream_before_any_record(live_server):
    with httpx.Client(base_url=live_server(max_queue=1, max_batch_size=1), timeout=30) as http:
        running = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
        with http.stream("POST", "/v1/generate", json=running) as first:
            lines = first.iter_lines()
            read_until_tokens(lines, 1)  # the worker is busy with this request now
            queued = threading.Thread(target=http.post, args=("/v1/generate",),
                                      kwargs={"json": {"prompt": PROMPT, "max_tokens": 1}})
            queued.start()
            time.sleep(0.5)  # time for the second request to take the one queue slot

            rejected = http.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2, "stream": True})
        queued.join(10)
        listed = http.get("/v1/judgments").json()["data"]

    assert_error(rejected, 429, type="rate_limit_error", code="queue_full")
    assert rejected.headers["Retry-After"] == "2"
    # Only the two accepted requests left records: the first one cancelled when its client left.
    assert sorted(item["status"] for item in listed) == ["cancelled", "completed"]
