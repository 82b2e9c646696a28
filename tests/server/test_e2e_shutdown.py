"""SIGTERM on a real `tracehead serve` process with the default model: in-flight requests and their records."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.store import AuditStore, JudgmentQuery, JudgmentRecord, create_engine_for
from tests.server.helpers import free_port, start_server

pytestmark = pytest.mark.e2e

# About 200 tokens of output: several seconds of decoding on a CPU, so a signal lands mid-generation.
COUNTING = {"messages": [{"role": "user", "content": "Count from 1 to 100, separated by commas."}],
            "max_tokens": 200, "temperature": 0}
EXIT_TIMEOUT_S = 180  # longer than any grace period these tests set


def stored_record(data_dir: Path, judgment_id: str) -> JudgmentRecord:
    """Read a judgment from the stopped server's SQLite store."""
    engine = create_engine_for(f"sqlite:///{data_dir / 'tracehead.db'}")
    try:
        record = AuditStore(engine).get(judgment_id)
    finally:
        engine.dispose()
    assert record is not None, f"judgment {judgment_id} is not in the store"
    return record


def stream_and_stop(url: str, server: subprocess.Popen, tokens_before_signal: int) -> tuple[str, list[str], int]:
    """Stream a counting generation, send SIGTERM after some tokens, read what is left.

    Returns the judgment id, the event names received and the server's exit code.
    """
    names, judgment_id, signalled = [], None, False
    with httpx.stream("POST", f"{url}/v1/generate", json=COUNTING | {"stream": True}, timeout=120) as response:
        assert response.status_code == 200
        name = None
        try:
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    names.append(name)
                    if name == "prompt":
                        judgment_id = json.loads(line.removeprefix("data: "))["id"]
                    if names.count("token") == tokens_before_signal and not signalled:
                        server.send_signal(signal.SIGTERM)
                        signalled = True
        except httpx.RemoteProtocolError:
            pass  # the server cut the stream at the end of its grace period
    return judgment_id, names, server.wait(EXIT_TIMEOUT_S)


def test_sigterm_lets_a_running_generation_finish(default_model_path, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port, TRACEHEAD_SHUTDOWN_GRACE_S="120")  # far longer than the generation
    url = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/generate", json=COUNTING, timeout=120)
            time.sleep(2)  # the generation is decoding by now
            server.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{url}/v1/judgments", timeout=5)
            response = pending.result()
        returncode = server.wait(EXIT_TIMEOUT_S)
    finally:
        server.kill()
        server.wait()

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] > 20
    assert returncode == 0
    record = stored_record(tmp_path, body["id"])
    assert record.status == "completed"
    assert record.output == body["text"]
    assert record.completion_tokens == body["usage"]["completion_tokens"]


def stream_on_new_server(data_dir, **settings: str) -> tuple[str, list[str], int]:
    """Start a server, stream from it and send SIGTERM after three tokens; return what stream_and_stop does."""
    port = free_port()
    server = start_server(data_dir, port, **settings)
    try:
        return stream_and_stop(f"http://127.0.0.1:{port}", server, tokens_before_signal=3)
    finally:
        server.kill()
        server.wait()


def test_sigterm_during_stream_completes_its_record(default_model_path, tmp_path):
    # The grace period is far longer than the generation needs (about 6 s here), even on a busy machine.
    judgment_id, names, returncode = stream_on_new_server(tmp_path, TRACEHEAD_SHUTDOWN_GRACE_S="120")

    assert returncode == 0
    assert names[-1] == "judgment"
    record = stored_record(tmp_path, judgment_id)
    assert record.status == "completed"
    assert record.completion_tokens == names.count("token")


def test_short_grace_cancels_stream(default_model_path, tmp_path):
    judgment_id, names, returncode = stream_on_new_server(tmp_path, TRACEHEAD_SHUTDOWN_GRACE_S="1")

    assert returncode == 0
    assert "judgment" not in names
    record = stored_record(tmp_path, judgment_id)
    assert record.status == "cancelled"
    assert record.finish_reason == "cancelled"
    assert names.count("token") <= record.completion_tokens < COUNTING["max_tokens"]
    assert len(record.trace["output_tokens"]) == record.completion_tokens


def test_sigterm_after_short_grace_commits_cut_off_request(default_model_path, tmp_path):
    port = free_port()
    server = start_server(tmp_path, port, TRACEHEAD_SHUTDOWN_GRACE_S="1")
    url = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/generate", json=COUNTING, timeout=120)
            time.sleep(3)  # the generation is decoding by now, and needs longer than the grace period
            server.send_signal(signal.SIGTERM)
            response = pending.result()
        returncode = server.wait(EXIT_TIMEOUT_S)
    finally:
        server.kill()
        server.wait()

    assert response.status_code == 500  # uvicorn's own response to a request it cut off
    assert returncode == 0
    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    try:
        [record] = AuditStore(engine).list(JudgmentQuery(), 10, None).items
    finally:
        engine.dispose()
    assert record.status == "cancelled"
    assert 0 < record.completion_tokens < COUNTING["max_tokens"]
