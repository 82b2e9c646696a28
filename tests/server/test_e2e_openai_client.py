"""The official openai client against a real tracehead server on the real default model."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server.helpers import free_port, start_server

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
# A prompt with a long answer, so that a client can disconnect while tokens are still coming.
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
CONSTRAINTS = {"testifiability", "decidability", "reciprocity", "causality"}


@pytest.fixture(scope="module")
def server_url(default_model_path, tmp_path_factory) -> Iterator[str]:
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("openai-e2e"), port)
    yield f"http://127.0.0.1:{port}"
    server.kill()
    server.wait()


@pytest.fixture(scope="module")
def client(server_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=120)


def stored(server_url: str, judgment_id: str) -> dict:
    response = httpx.get(f"{server_url}/v1/judgments/{judgment_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_completion_with_trace(client, server_url):
    completion = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=32, temperature=0)

    content = completion.choices[0].message.content
    assert "Paris" in content
    assert completion.choices[0].finish_reason == "stop"
    extension = completion.model_extra["tracehead"]
    assert extension["judgment_id"] == completion.id
    assert extension["heads"]["name"] == "tracehead-smollm2-135m-v2"
    assert set(extension["judgment"]["constraints"]) == CONSTRAINTS
    output_tokens = extension["trace"]["output_tokens"]
    assert len(output_tokens) == completion.usage.completion_tokens

    record = stored(server_url, completion.id)
    assert record["text"] == content
    assert record["trace"] == extension["trace"]
    assert record["status"] == "completed"


def test_streamed_chat_completion(client, server_url):
    stream = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)

    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" in content
    final = next(chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason)
    assert final.choices[0].finish_reason == "stop"
    judgment_id = final.model_extra["tracehead"]["judgment_id"]
    assert judgment_id == chunks[0].id
    token_traces = [chunk.model_extra["tracehead"]["token"] for chunk in chunks
                    if chunk.choices and chunk.choices[0].delta.content]
    assert all(set(token["scores"]) == CONSTRAINTS for token in token_traces)
    assert chunks[-1].usage.completion_tokens == len(stored(server_url, judgment_id)["trace"]["output_tokens"])

    record = stored(server_url, judgment_id)
    assert record["status"] == "completed"
    assert record["text"] == content
    assert record["judgment"]["constraints"] == final.model_extra["tracehead"]["judgment"]["constraints"]


def test_seed_reproduces_sampled_completion(client):
    runs = [client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=24, temperature=0.9, seed=42)
            for _ in range(2)]

    assert runs[0].choices[0].message.content == runs[1].choices[0].message.content
    assert runs[0].model_extra["tracehead"]["trace"] == runs[1].model_extra["tracehead"]["trace"]
    assert runs[0].system_fingerprint == runs[1].system_fingerprint


def test_disconnect_leaves_cancelled_record_and_frees_worker(client, server_url):
    stream = client.chat.completions.create(model=MODEL, messages=COUNTING, max_tokens=300, temperature=0,
                                            stream=True)
    received = [next(stream) for _ in range(6)]  # the role chunk and five tokens
    stream.close()
    judgment_id = received[0].id

    deadline = time.monotonic() + 30
    while (record := stored(server_url, judgment_id))["status"] == "started":
        assert time.monotonic() < deadline, "the record stayed started for 30 s after the client disconnected"
        time.sleep(0.1)
    following = client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=8, temperature=0)

    assert record["status"] == "cancelled"
    assert 5 <= record["usage"]["completion_tokens"] < 300
    assert len(record["trace"]["output_tokens"]) == record["usage"]["completion_tokens"]
    assert following.choices[0].message.content


def test_errors_reach_the_client_as_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=CAPITAL, n=2)
    assert "only n=1 is supported" in raised.value.message
    assert raised.value.body["param"] == "n"

    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=CAPITAL)
    assert raised.value.body["code"] == "model_not_found"
