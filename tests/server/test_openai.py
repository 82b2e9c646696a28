"""OpenAI-compatible routes on the tiny model: shapes, streaming chunks, policies and errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.conftest import CONSTRAINTS
from tests.server.helpers import MAX_TOKENS_LIMIT, PROMPT, assert_error, assert_trace_consistent, read_events

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Where is Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("openai"), max_tokens_limit=MAX_TOKENS_LIMIT),
                     tiny_model)
    with TestClient(app) as client:
        yield client


def chat(client: TestClient, **fields) -> dict:
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 6,
                                                         "seed": 3} | fields)
    assert response.status_code == 200, response.text
    return response.json()


def stored(client: TestClient, judgment_id: str) -> dict:
    response = client.get(f"/v1/judgments/{judgment_id}")
    assert response.status_code == 200, response.text
    return response.json()


def stream_chunks(client: TestClient, path: str, body: dict) -> list[str]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [data for _, data in read_events(response)]


# Models

def test_models_lists_served_model_with_heads(client, tiny_model):
    body = client.get("/v1/models").json()

    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    heads = model["tracehead"]["heads"]
    assert heads["name"] == "tiny-heads"
    assert heads["fingerprint"] == tiny_model.heads.fingerprint()
    assert heads["constraints"] == CONSTRAINTS
    assert model["tracehead"]["model_fingerprint"] == tiny_model.base.fingerprint
    assert client.get(f"/v1/models/{MODEL}").json() == model


def test_unknown_model_is_404(client):
    assert_error(client.get("/v1/models/gpt-4o"), 404, param="model", code="model_not_found",
                 fragments=("'gpt-4o' is not served here", f"send model='{MODEL}'"))
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert_error(response, 404, param="model", code="model_not_found")


# Chat completions

def test_chat_completion_shape_and_extension(client):
    body = chat(client, user="user-7", metadata={"team": "qa"})

    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    assert body["system_fingerprint"].startswith("fp_")
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert choice["logprobs"] is None
    extension = body["tracehead"]
    assert extension["judgment_id"] == body["id"]
    assert extension["model"]["name"] == MODEL
    assert extension["heads"]["name"] == "tiny-heads"
    assert extension["seed"] == 3
    assert extension["status"] == "completed"
    assert_trace_consistent({"trace": extension["trace"], "usage": body["usage"], "judgment": extension["judgment"]})

    record = stored(client, body["id"])
    assert record["trace"] == extension["trace"]
    assert record["text"] == choice["message"]["content"]
    assert record["parameters"]["endpoint"] == "chat.completions"
    assert record["parameters"]["user"] == "user-7"
    assert record["metadata"] == {"team": "qa"}
    assert record["input"] == {"messages": MESSAGES}


def test_chat_accepts_openai_message_forms(client):
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Where is "},
                                                            {"type": "text", "text": "Paris?"}]}]
    body = chat(client, messages=messages)

    assert stored(client, body["id"])["input"] == {"messages": [{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Where is Paris?"}]}


def test_chat_ignores_unknown_common_fields(client, caplog):
    with caplog.at_level(logging.DEBUG, logger="server.routes.openai"):
        body = chat(client, store=False, service_tier="auto", parallel_tool_calls=True, reasoning_effort="low",
                    n=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[], tool_choice="none",
                    response_format={"type": "text"}, stream_options=None, max_completion_tokens=6)

    assert body["usage"]["completion_tokens"] <= 6
    assert "ignored fields parallel_tool_calls, reasoning_effort, service_tier, store" in caplog.text


def test_include_trace_false_keeps_judgment(client):
    body = chat(client, include_trace=False)

    assert "trace" not in body["tracehead"]
    assert list(body["tracehead"]["judgment"]["constraints"]) == CONSTRAINTS
    assert stored(client, body["id"])["trace"]["output_tokens"]


def test_chat_logprobs(client):
    body = chat(client, logprobs=True, top_logprobs=2)

    content = body["choices"][0]["logprobs"]["content"]
    output_tokens = body["tracehead"]["trace"]["output_tokens"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry, token in zip(content, output_tokens):
        assert entry["token"] == token["text"]
        assert entry["logprob"] == token["logprob"]
        assert entry["bytes"] == list(token["text"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]


def test_same_seed_reproduces_text_and_trace(client):
    first = chat(client, temperature=1.5, seed=11, max_tokens=10)
    second = chat(client, temperature=1.5, seed=11, max_tokens=10)

    assert first["id"] != second["id"]
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["tracehead"]["trace"] == second["tracehead"]["trace"]
    assert first["system_fingerprint"] == second["system_fingerprint"]


def test_drawn_seed_replays(client):
    first = chat(client, temperature=1.5, seed=None, max_tokens=10)
    replay = chat(client, temperature=1.5, seed=first["tracehead"]["seed"], max_tokens=10)

    assert stored(client, first["id"])["parameters"]["seed_from_request"] is False
    assert replay["tracehead"]["trace"] == first["tracehead"]["trace"]


# Completions

def test_completion_shape(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": [PROMPT], "max_tokens": 5, "seed": 1,
                                                    "logprobs": 2})
    assert response.status_code == 200, response.text
    body = response.json()

    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    tokens = body["tracehead"]["trace"]["output_tokens"]
    assert logprobs["tokens"] == [token["text"] for token in tokens]
    assert logprobs["token_logprobs"] == [token["logprob"] for token in tokens]
    assert all(len(alternatives) <= 2 for alternatives in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    assert stored(client, body["id"])["input"] == {"prompt": PROMPT}


def test_completion_echo_prepends_prompt(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "seed": 1,
                                                    "echo": True})
    body = response.json()

    assert body["choices"][0]["text"] == PROMPT + stored(client, body["id"])["text"]


# Streaming

def test_streamed_chat_chunks(client):
    chunks = stream_chunks(client, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 8, "seed": 4, "stream": True, "logprobs": True,
        "stream_options": {"include_usage": True}})

    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(chunk) for chunk in chunks[:-1]]
    judgment_id = parsed[0]["id"]
    assert all(chunk["id"] == judgment_id and chunk["object"] == "chat.completion.chunk" for chunk in parsed)
    first, *tokens, final, usage = parsed
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["tracehead"]["judgment_id"] == judgment_id
    assert final["choices"][0]["delta"] == {}
    assert usage["choices"] == []

    record = stored(client, judgment_id)
    assert record["status"] == "completed"
    assert first["tracehead"]["prompt_tokens"] == record["trace"]["prompt_tokens"]
    assert [chunk["tracehead"]["token"] for chunk in tokens] == record["trace"]["output_tokens"]
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in tokens) == record["text"]
    assert [chunk["choices"][0]["logprobs"]["content"][0]["logprob"] for chunk in tokens] == [
        token["logprob"] for token in record["trace"]["output_tokens"]]
    assert final["choices"][0]["finish_reason"] == record["finish_reason"]
    assert final["tracehead"]["judgment"]["flagged"] == record["judgment"]["flagged"]
    assert final["tracehead"]["judgment"]["constraints"] == record["judgment"]["constraints"]
    assert usage["usage"] == record["usage"]


def test_streamed_chat_equals_unstreamed(client):
    chunks = stream_chunks(client, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 8, "seed": 9, "stream": True, "include_trace": False})
    parsed = [json.loads(chunk) for chunk in chunks[:-1]]
    unstreamed = chat(client, max_tokens=8, seed=9)

    assert all("tracehead" not in chunk for chunk in parsed[1:-1])
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in parsed)
    assert text == unstreamed["choices"][0]["message"]["content"]
    assert parsed[-1]["choices"][0]["finish_reason"] == unstreamed["choices"][0]["finish_reason"]


def test_streamed_completion_chunks(client):
    chunks = stream_chunks(client, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "seed": 2,
                                                       "stream": True, "echo": True})

    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(chunk) for chunk in chunks[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in parsed)
    text = "".join(chunk["choices"][0]["text"] for chunk in parsed)
    assert text == PROMPT + stored(client, parsed[0]["id"])["text"]
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in parsed[-1]


# Policies

def test_flag_policy_marks_judgment_and_returns_text(client):
    body = chat(client, policy={"causality": {"min_score": 1.0, "action": "flag"}})

    extension = body["tracehead"]
    policy = extension["judgment"]["policy"]
    assert policy["rules"] == {"causality": {"min_score": 1.0, "action": "flag"}}
    [triggered] = policy["triggered"]
    first_output = extension["trace"]["output_tokens"][0]
    assert triggered == {"constraint": "causality", "action": "flag", "position": first_output["position"],
                         "score": first_output["scores"]["causality"], "min_score": 1.0}
    assert policy["withheld"] is False
    assert extension["judgment"]["flagged"] is True
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["choices"][0]["message"]["content"] == stored(client, body["id"])["text"]


def test_untriggered_policy_changes_nothing(client):
    plain = chat(client, max_tokens=8)
    ruled = chat(client, max_tokens=8, policy={name: {"min_score": 0.0, "action": "stop"} for name in CONSTRAINTS})

    assert ruled["choices"] == plain["choices"]
    assert ruled["tracehead"]["judgment"]["policy"]["triggered"] == []
    assert ruled["tracehead"]["judgment"]["flagged"] == plain["tracehead"]["judgment"]["flagged"]


def test_stop_policy_ends_at_first_token(client):
    body = chat(client, max_tokens=8, policy={"reciprocity": {"min_score": 1.0, "action": "stop"}})

    assert body["choices"][0]["finish_reason"] == "constraint"
    assert body["usage"]["completion_tokens"] == 1
    [triggered] = body["tracehead"]["judgment"]["policy"]["triggered"]
    assert triggered["action"] == "stop"
    assert triggered["position"] == body["tracehead"]["trace"]["output_tokens"][0]["position"]
    record = stored(client, body["id"])
    assert record["finish_reason"] == "constraint"
    assert record["judgment"]["policy"] == body["tracehead"]["judgment"]["policy"]


def test_withhold_policy_hides_text_but_stores_it(client):
    body = chat(client, max_tokens=6, logprobs=True,
                policy={"testifiability": {"min_score": 1.0, "action": "withhold"}})

    choice = body["choices"][0]
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "constraint"
    assert choice["logprobs"] is None
    for token in body["tracehead"]["trace"]["output_tokens"]:
        assert token["token_id"] is None
        assert token["text"] is None
        assert token["logprob"] is None
        assert set(token["scores"]) == set(CONSTRAINTS)
    record = stored(client, body["id"])
    assert record["judgment"]["policy"]["withheld"] is True
    assert record["text"] == "".join(token["text"] for token in record["trace"]["output_tokens"]
                                     if token["text"] != "<|im_end|>")
    assert record["trace"]["output_tokens"][0]["token_id"] is not None


def test_withhold_policy_in_stream_sends_no_text(client):
    chunks = stream_chunks(client, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 6, "seed": 1, "stream": True,
        "policy": {"decidability": {"min_score": 1.0, "action": "withhold"}}})
    parsed = [json.loads(chunk) for chunk in chunks[:-1]]

    assert all(chunk["choices"][0]["delta"].get("content", "") == "" for chunk in parsed)
    assert all(chunk["tracehead"]["token"]["text"] is None for chunk in parsed[1:-1])
    assert parsed[-1]["choices"][0]["finish_reason"] == "constraint"


def test_untriggered_withhold_releases_text(client):
    chunks = stream_chunks(client, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 6, "seed": 1, "stream": True,
        "policy": {"decidability": {"min_score": 0.0, "action": "withhold"}}})
    parsed = [json.loads(chunk) for chunk in chunks[:-1]]
    texts = [chunk["choices"][0]["delta"].get("content", "") for chunk in parsed]

    # Held back until the end, then sent whole in the chunk before the final one.
    assert all(text == "" for text in texts[:-2])
    assert texts[-2] == stored(client, parsed[0]["id"])["text"]
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_server_default_policy_applies_and_request_overrides(tmp_path, tiny_model):
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT,
                        policy={"reciprocity": {"min_score": 1.0, "action": "stop"}})
    with TestClient(create_app(settings, tiny_model)) as client:
        default = chat(client, max_tokens=8)
        overridden = chat(client, max_tokens=8, policy={"reciprocity": {"min_score": 1.0, "action": "flag"}})

    assert default["choices"][0]["finish_reason"] == "constraint"
    assert overridden["choices"][0]["finish_reason"] in ("stop", "length")
    assert overridden["tracehead"]["judgment"]["policy"]["rules"] == {
        "reciprocity": {"min_score": 1.0, "action": "flag"}}


def test_server_policy_with_unknown_constraint_refused_at_start(tmp_path, tiny_model):
    settings = Settings(data_dir=tmp_path, policy={"honesty": {"min_score": 0.5, "action": "flag"}})

    with pytest.raises(ValueError, match="TRACEHEAD_POLICY names 'honesty', which the loaded heads do not score"):
        with TestClient(create_app(settings, tiny_model)):
            pass


# Errors

@pytest.mark.parametrize(("fields", "param", "fragment"), [
    ({"n": 2}, "n", "only n=1 is supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "penalties are not supported"),
    ({"logit_bias": {"15": 2}}, "logit_bias", "logit bias is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "calls no tools"),
    ({"response_format": {"type": "json_object"}}, "response_format.type", "Input should be 'text'"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "received 'tool'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "content part 0 has type 'image_url'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid string"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"temperature": 3}, "temperature", "less than or equal to 2"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs=true"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "less than or equal to 20"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens", "differs from max_completion_tokens=5"),
    ({"max_completion_tokens": MAX_TOKENS_LIMIT + 1}, "max_completion_tokens", f"limit of {MAX_TOKENS_LIMIT}"),
    ({"policy": {"honesty": {"min_score": 0.5, "action": "flag"}}}, "policy", "'honesty', which the loaded heads"),
    ({"policy": {"causality": {"min_score": 0.5, "action": "block"}}}, "policy.causality.action",
     "'flag', 'stop' or 'withhold'"),
    ({"policy": {"causality": {"min_score": 1.5, "action": "flag"}}}, "policy.causality.min_score",
     "less than or equal to 1"),
    ({"include_trace": "no"}, "include_trace", "valid boolean"),
])
def test_chat_errors_are_400_in_openai_shape(client, fields, param, fragment):
    body = {"model": MODEL, "messages": MESSAGES} | fields
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=param, code="invalid_value",
                 fragments=(fragment,))


@pytest.mark.parametrize(("fields", "param", "fragment"), [
    ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
    ({"prompt": "  "}, "prompt", "must not be empty"),
    ({"suffix": "end"}, "suffix", "insertion is not supported"),
    ({"best_of": 3}, "best_of", "only best_of=1"),
    ({"echo": True, "logprobs": 1}, "echo", "echo=true together with logprobs"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
])
def test_completion_errors_are_400(client, fields, param, fragment):
    body = {"model": MODEL, "prompt": PROMPT} | fields
    assert_error(client.post("/v1/completions", json=body), 400, param=param, code="invalid_value",
                 fragments=(fragment,))


def test_prompt_over_context_is_400(client):
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 200, "max_tokens": 4})

    assert_error(response, 400, param="prompt", code="context_length_exceeded", fragments=("context holds",))


def test_messages_over_context_name_messages(client):
    messages = [{"role": "user", "content": "word " * 200}]
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4})

    assert_error(response, 400, param="messages", code="context_length_exceeded", fragments=("context holds",))


def test_invalid_json_is_400(client):
    response = client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})

    assert_error(response, 400, param="body", code="invalid_value", fragments=("not valid JSON",))
