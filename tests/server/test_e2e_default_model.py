"""End to end on the real default model: a real server process over real HTTP."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.server.helpers import free_port, start_server

pytestmark = pytest.mark.e2e

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32, "temperature": 0, "metadata": {"case": "capital"}}
CONSTRAINTS = {"testifiability", "decidability", "reciprocity", "causality"}


def test_capital_question_round_trip(default_model_path, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=QUESTION, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "Paris" in body["text"]
        assert body["model"] == "SmolLM2-135M-Instruct"
        output_tokens = body["trace"]["output_tokens"]
        assert len(output_tokens) == body["usage"]["completion_tokens"] > 0
        for token in output_tokens:
            assert set(token["scores"]) == CONSTRAINTS
            assert set(token["attention"]) == CONSTRAINTS
        assert set(body["judgment"]["constraints"]) == CONSTRAINTS

        stored = httpx.get(f"http://127.0.0.1:{port}/v1/judgments/{body['id']}", timeout=10).json()
        assert stored["trace"] == body["trace"]
        assert stored["judgment"] == body["judgment"]
        assert stored["metadata"] == {"case": "capital"}

        # Re-judging the same text must reproduce the generation's trace: one pass instead of many steps.
        scored = httpx.post(f"http://127.0.0.1:{port}/v1/score", timeout=60,
                            json={"messages": QUESTION["messages"], "response": body["text"]}).json()
        assert scored["kind"] == "score"
        assert [t["token_id"] for t in scored["trace"]["output_tokens"]] == [t["token_id"] for t in output_tokens]
        for constraint, verdict in scored["judgment"]["constraints"].items():
            assert abs(verdict["score"] - body["judgment"]["constraints"][constraint]["score"]) < 1e-3
        assert httpx.get(f"http://127.0.0.1:{port}/v1/judgments/{scored['id']}", timeout=10).json()["kind"] == "score"
    finally:
        server.kill()
        server.wait()


def test_sigkill_after_response_loses_nothing(default_model_path, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port)
    try:
        body = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json=QUESTION, timeout=120).json()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()

    restarted = start_server(tmp_path, port)
    try:
        stored = httpx.get(f"http://127.0.0.1:{port}/v1/judgments/{body['id']}", timeout=10)
        assert stored.status_code == 200
        assert stored.json()["trace"] == body["trace"]
        assert stored.json()["text"] == body["text"]
    finally:
        restarted.kill()
        restarted.wait()
