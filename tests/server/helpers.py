"""Helpers shared by the HTTP API tests: the test app and checks of error bodies and traces."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

from models.decode import ConstraintModel
from server.app import create_app
from server.settings import Settings
from tests.conftest import CONSTRAINTS

# max_tokens_limit of the test apps. It is small so that a short prompt plus max_tokens fits TINY_CONTEXT.
MAX_TOKENS_LIMIT = 32
PROMPT = "The capital of France is"
ERROR_FIELDS = {"message", "type", "param", "code"}


def make_app(data_dir, model: ConstraintModel) -> FastAPI:
    return create_app(Settings(data_dir=data_dir, max_tokens_limit=MAX_TOKENS_LIMIT), model)


def assert_error(response, status_code: int, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, fragments: tuple[str, ...] = ()) -> dict:
    """Check the status and the one error body shape, then return the error object."""
    assert response.status_code == status_code, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == ERROR_FIELDS
    assert isinstance(error["message"], str)
    assert error["type"] == type
    assert error["param"] == param
    assert error["code"] == code
    for fragment in fragments:
        assert fragment in error["message"], f"{fragment!r} missing from {error['message']!r}"
    return error


def assert_trace_consistent(body: dict) -> None:
    """Check the trace against the usage and the judgment of one generation response."""
    trace, usage, judgment = body["trace"], body["usage"], body["judgment"]
    assert trace["constraints"] == CONSTRAINTS
    assert len(trace["prompt_tokens"]) == usage["prompt_tokens"]
    assert len(trace["output_tokens"]) == usage["completion_tokens"]

    tokens = trace["prompt_tokens"] + trace["output_tokens"]
    assert [token["position"] for token in tokens] == list(range(len(tokens)))
    for token in trace["prompt_tokens"]:
        assert token["logprob"] is None
    for token in trace["output_tokens"]:
        assert token["logprob"] <= 0
    for token in tokens:
        assert set(token["scores"]) == set(CONSTRAINTS)
        assert all(0 <= score <= 1 for score in token["scores"].values())
        assert set(token["attention"]) == set(CONSTRAINTS)
        for pairs in token["attention"].values():
            assert 1 <= len(pairs) <= 3  # top_k_attention of the tiny model
            assert all(position <= token["position"] for position, _ in pairs)

    last = trace["output_tokens"][-1]
    output_positions = {token["position"] for token in trace["output_tokens"]}
    for name in CONSTRAINTS:
        verdict = judgment["constraints"][name]
        assert verdict["score"] == last["scores"][name]
        assert verdict["min_score"] == min(token["scores"][name] for token in trace["output_tokens"])
        assert verdict["min_position"] in output_positions
        assert verdict["passed"] == (verdict["score"] >= verdict["threshold"])
    assert judgment["flagged"] == any(not verdict["passed"] for verdict in judgment["constraints"].values())


def read_events(response) -> list[tuple[str | None, str]]:
    """Split a server-sent event stream into (event name or None, data) pairs."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, line.removeprefix("data: ")))
            name = None
    return events


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(data_dir: Path, port: int, **settings: str) -> subprocess.Popen:
    """Start `tracehead serve` on the default model; ``settings`` are extra TRACEHEAD_* variables."""
    env = os.environ | {"TRACEHEAD_DATA_DIR": str(data_dir), "TRACEHEAD_PORT": str(port),
                        "TRACEHEAD_HOST": "127.0.0.1"} | settings
    log = (data_dir / f"server-{port}.log").open("a")
    process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{Path(log.name).read_text()}")
        try:
            # /readyz needs no API key, so this also waits for a server started with TRACEHEAD_AUTH=keys.
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # not listening yet, or /readyz returned 503 while the model loads
    process.kill()
    raise AssertionError("server did not become ready within 180 s")
