"""Request limits on the tiny model: body size (413) and prompt length (400)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import TINY_CONTEXT
from tests.server.helpers import MAX_TOKENS_LIMIT, assert_error

MAX_BODY_BYTES = 2000
MAX_PROMPT_TOKENS = 8


@pytest.fixture
def client(tmp_path, tiny_model) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT, max_body_bytes=MAX_BODY_BYTES,
                        max_prompt_tokens=MAX_PROMPT_TOKENS)
    with TestClient(create_app(settings, tiny_model)) as client:
        yield client


def judgment_count(client: TestClient) -> int:
    return len(client.get("/v1/judgments", params={"limit": 100}).json()["data"])


def oversized_body() -> bytes:
    body = b'{"prompt": "' + b"a" * MAX_BODY_BYTES + b'", "max_tokens": 1}'
    assert len(body) > MAX_BODY_BYTES
    return body


@pytest.mark.parametrize("path", ["/v1/generate", "/v1/score", "/v1/chat/completions", "/v1/completions"])
def test_body_over_content_length_limit_is_413(client, path):
    body = oversized_body()

    response = client.post(path, content=body, headers={"Content-Type": "application/json"})

    assert_error(response, 413, param="body", code="body_too_large",
                 fragments=(f"{len(body)} bytes (Content-Length)", f"limit of {MAX_BODY_BYTES} bytes"))
    assert "X-Request-ID" in response.headers
    assert judgment_count(client) == 0


def test_chunked_body_over_limit_is_413(client):
    chunks = [b'{"prompt": "'] + [b"a" * 500] * 5 + [b'", "max_tokens": 1}']

    # A generator body is sent with Transfer-Encoding: chunked and no Content-Length.
    response = client.post("/v1/generate", content=iter(chunks), headers={"Content-Type": "application/json"})

    assert_error(response, 413, param="body", code="body_too_large",
                 fragments=(f"more than {MAX_BODY_BYTES} bytes (chunked)",))
    assert judgment_count(client) == 0


def test_chunked_body_under_limit_is_served(client):
    chunks = [b'{"prompt": "', b"The capital", b'", "max_tokens": 2}']

    response = client.post("/v1/generate", content=iter(chunks), headers={"Content-Type": "application/json"})

    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2


def test_prompt_over_max_prompt_tokens_is_400(client, tiny_model):
    prompt = "The capital of France is Paris. " * 2
    prompt_tokens = len(tiny_model.encode(prompt))
    assert MAX_PROMPT_TOKENS < prompt_tokens < TINY_CONTEXT

    response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 2})

    assert_error(response, 400, param="prompt", code="prompt_too_long",
                 fragments=(f"prompt has {prompt_tokens} tokens", f"limit of {MAX_PROMPT_TOKENS} prompt tokens"))
    assert judgment_count(client) == 0


def test_messages_over_max_prompt_tokens_is_400(client, tiny_model):
    messages = [{"role": "user", "content": "hi"}]
    prompt_tokens = len(tiny_model.encode(None, messages))
    assert prompt_tokens > MAX_PROMPT_TOKENS

    response = client.post("/v1/generate", json={"messages": messages, "max_tokens": 2})

    assert_error(response, 400, param="messages", code="prompt_too_long",
                 fragments=(f"messages has {prompt_tokens} tokens", str(MAX_PROMPT_TOKENS)))


def test_openai_chat_over_max_prompt_tokens_is_400(client):
    response = client.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [
        {"role": "user", "content": "The capital of France is Paris. " * 2}], "max_tokens": 2})

    assert_error(response, 400, param="messages", code="prompt_too_long")


def test_score_over_max_prompt_tokens_is_400(client):
    response = client.post("/v1/score", json={"prompt": "The capital of France is Paris. " * 2, "response": "Yes"})

    assert_error(response, 400, param="prompt", code="prompt_too_long")


def test_prompt_at_max_prompt_tokens_is_served(client, tiny_model):
    prompt = "The capital"
    assert len(tiny_model.encode(prompt)) <= MAX_PROMPT_TOKENS

    response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 2})

    assert response.status_code == 200, response.text


def test_default_prompt_limit_is_context_length(tmp_path, tiny_model):
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT)
    prompt = "The capital of France is Paris. " * 12
    prompt_tokens = len(tiny_model.encode(prompt))
    assert settings.max_prompt_tokens is None
    assert prompt_tokens > TINY_CONTEXT

    with TestClient(create_app(settings, tiny_model)) as client:
        response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": 1})

    assert_error(response, 400, param="prompt", code="context_length_exceeded",
                 fragments=(f"prompt is {prompt_tokens} tokens", f"context holds {TINY_CONTEXT} tokens"))
