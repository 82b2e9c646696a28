"""HTTP API tests against the tiny model: generation, judgment reads, listing, and every error path."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from server.store import new_judgment_id
from server.worker import GenerationWorker
from tests.conftest import CONSTRAINTS, TINY_CONTEXT
from tests.server.helpers import (
    ERROR_FIELDS,
    MAX_TOKENS_LIMIT,
    PROMPT,
    assert_error,
    assert_trace_consistent,
    make_app,
)

# Seeds 0-4 with 20 tokens of PROMPT give both flagged and unflagged judgments with the tiny model.
LISTING_SEEDS = range(5)
LISTING_MAX_TOKENS = 20



@pytest.fixture
def app(tmp_path, tiny_model) -> FastAPI:
    return make_app(tmp_path, tiny_model)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def shared_client(tmp_path_factory, tiny_model) -> Iterator[TestClient]:
    """A client for tests whose outcome does not depend on what the store already contains.

    Server exceptions become 500 responses instead of being raised, so that a test can assert on the status.
    """
    app = make_app(tmp_path_factory.mktemp("shared"), tiny_model)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def listing(tmp_path_factory, tiny_model) -> Iterator[tuple[TestClient, list[dict]]]:
    """A client whose store contains exactly five judgments, with the generation responses oldest first."""
    app = make_app(tmp_path_factory.mktemp("listing"), tiny_model)
    with TestClient(app) as client:
        created = []
        for seed in LISTING_SEEDS:
            response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": LISTING_MAX_TOKENS,
                                                         "seed": seed})
            assert response.status_code == 200, response.text
            created.append(response.json())
        flagged = {body["judgment"]["flagged"] for body in created}
        assert flagged == {True, False}, "the listing seeds no longer give a mix of flagged and unflagged judgments"
        yield client, created


def generate(client: TestClient, **fields) -> dict:
    body = {"prompt": PROMPT, "max_tokens": 8} | fields
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def judgment_count(app: FastAPI) -> int:
    with app.state.runtime.engine.connect() as connection:
        return connection.execute(text("SELECT count(*) FROM judgments")).scalar_one()


def list_ids(client: TestClient, **params) -> list[str]:
    response = client.get("/v1/judgments", params=params)
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


# Generation round trip

@pytest.mark.parametrize("request_input", [
    {"prompt": PROMPT},
    {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Paris?"}]},
], ids=["prompt", "messages"])
def test_generate_returns_judged_trace(client, request_input):
    response = client.post("/v1/generate", json=request_input | {"max_tokens": 6, "seed": 7})

    assert response.status_code == 200, response.text
    body = response.json()
    assert uuid.UUID(body["id"]).version == 7
    assert body["object"] == "judgment"
    assert body["model"] == "tiny-llama"
    assert body["heads"] == "tiny-heads"
    assert isinstance(body["text"], str)
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert list(body["judgment"]["constraints"]) == CONSTRAINTS
    for verdict in body["judgment"]["constraints"].values():
        assert set(verdict) == {"score", "min_score", "min_position", "threshold", "passed"}
    assert_trace_consistent(body)


def test_chat_prompt_longer_than_raw(client):
    raw = generate(client, prompt="Where is Paris?")
    response = client.post("/v1/generate", json={"messages": [{"role": "user", "content": "Where is Paris?"}],
                                                 "max_tokens": 8})
    assert response.status_code == 200, response.text
    chat = response.json()

    # The chat template wraps the message in role markers, so it costs more prompt tokens.
    assert chat["usage"]["prompt_tokens"] > raw["usage"]["prompt_tokens"]
    assert chat["trace"]["prompt_tokens"][0]["text"] == "<|im_start|>"


def test_request_id_generated_when_absent(client):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})

    assert response.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])


def test_valid_request_id_echoed(client):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2},
                           headers={"X-Request-ID": "gateway-42.a:b_c"})

    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "gateway-42.a:b_c"
    stored = client.get(f"/v1/judgments/{response.json()['id']}").json()
    assert stored["request_id"] == "gateway-42.a:b_c"


@pytest.mark.parametrize("bad_id", ["bad id!", "x" * 129, "semi;colon"])
def test_invalid_request_id_replaced(client, bad_id):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2}, headers={"X-Request-ID": bad_id})

    assert response.status_code == 200
    replaced = response.headers["X-Request-ID"]
    assert replaced != bad_id
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)
    stored = client.get(f"/v1/judgments/{response.json()['id']}").json()
    assert stored["request_id"] == replaced


def test_request_id_on_error_responses(client):
    response = client.get("/v1/judgments/nope", headers={"X-Request-ID": "trace-me"})

    assert response.status_code == 404
    assert response.headers["X-Request-ID"] == "trace-me"


# Reading a judgment back

def test_stored_judgment_matches_response(client):
    messages = [{"role": "user", "content": "Is water wet?"}]
    metadata = {"team": "qa", "ticket": "T-1"}
    response = client.post("/v1/generate", json={"messages": messages, "max_tokens": 5, "temperature": 0.7,
                                                 "top_p": 0.9, "metadata": metadata})
    assert response.status_code == 200, response.text
    generated = response.json()

    stored_response = client.get(f"/v1/judgments/{generated['id']}")

    assert stored_response.status_code == 200, stored_response.text
    stored = stored_response.json()
    assert stored["trace"] == generated["trace"]
    assert stored["judgment"] == generated["judgment"]
    assert stored["text"] == generated["text"]
    assert stored["usage"] == generated["usage"]
    assert stored["finish_reason"] == generated["finish_reason"]
    assert stored["input"] == {"messages": messages}
    assert stored["metadata"] == metadata
    assert stored["request_id"] == response.headers["X-Request-ID"]
    assert stored["status"] == "completed"
    parameters = stored["parameters"]
    assert parameters["max_tokens"] == 5
    assert parameters["temperature"] == 0.7
    assert parameters["top_p"] == 0.9
    assert parameters["stop"] == []
    assert parameters["seed_from_request"] is False
    assert isinstance(parameters["seed"], int)


def test_stored_seed_reproduces_output(client):
    first = generate(client, max_tokens=12)
    seed = client.get(f"/v1/judgments/{first['id']}").json()["parameters"]["seed"]

    again = generate(client, max_tokens=12, seed=seed)

    stored = client.get(f"/v1/judgments/{again['id']}").json()["parameters"]
    assert stored["seed"] == seed
    assert stored["seed_from_request"] is True
    assert again["text"] == first["text"]


def test_stored_prompt_input_as_sent(client):
    generated = generate(client, prompt="  Cats are mammals.  ")

    stored = client.get(f"/v1/judgments/{generated['id']}").json()

    assert stored["input"] == {"prompt": "  Cats are mammals.  "}
    assert stored["metadata"] == {}


def test_unknown_judgment_is_404(client):
    judgment_id = new_judgment_id()

    response = client.get(f"/v1/judgments/{judgment_id}")

    assert_error(response, 404, type="not_found_error", param="judgment_id", code="judgment_not_found",
                 fragments=(judgment_id, "not found"))


# Sampling

def test_same_seed_same_output(client):
    first = generate(client, max_tokens=16, temperature=1.0, seed=1234)
    second = generate(client, max_tokens=16, temperature=1.0, seed=1234)

    assert second["id"] != first["id"]
    assert second["text"] == first["text"]
    first_scores = [token["scores"] for token in first["trace"]["output_tokens"]]
    second_scores = [token["scores"] for token in second["trace"]["output_tokens"]]
    assert second_scores == first_scores


def test_different_seed_different_output(client):
    first = generate(client, max_tokens=16, temperature=1.0, seed=1234)
    other = generate(client, max_tokens=16, temperature=1.0, seed=4321)

    first_ids = [token["token_id"] for token in first["trace"]["output_tokens"]]
    other_ids = [token["token_id"] for token in other["trace"]["output_tokens"]]
    assert other_ids != first_ids


def test_stop_sequence_ends_text(client):
    unstopped = generate(client, max_tokens=24, seed=5)
    # A letter pair from the unstopped text becomes the stop sequence, so the seeded run is known to reach it.
    match = re.search(r"[A-Za-z]{2}", unstopped["text"][1:])
    assert match is not None, f"no letter pair to stop on in {unstopped['text']!r}"
    stop = match.group()
    expected_text = unstopped["text"][:unstopped["text"].find(stop)]

    stopped = generate(client, max_tokens=24, seed=5, stop=[stop])

    assert stopped["finish_reason"] == "stop"
    assert stop not in stopped["text"]
    assert stopped["text"] == expected_text
    assert stopped["usage"]["completion_tokens"] < unstopped["usage"]["completion_tokens"]
    stored = client.get(f"/v1/judgments/{stopped['id']}").json()
    assert stored["parameters"]["stop"] == [stop]


def test_stop_as_single_string(client):
    unstopped = generate(client, max_tokens=24, seed=5)
    match = re.search(r"[A-Za-z]{2}", unstopped["text"][1:])
    assert match is not None, f"no letter pair to stop on in {unstopped['text']!r}"

    stopped = generate(client, max_tokens=24, seed=5, stop=match.group())

    assert stopped["finish_reason"] == "stop"
    assert match.group() not in stopped["text"]


def test_default_max_tokens_is_capped(client):
    generated = generate(client, max_tokens=None, temperature=0)

    stored = client.get(f"/v1/judgments/{generated['id']}").json()
    # default_max_tokens (128) is above this app's limit, so the limit applies.
    assert stored["parameters"]["max_tokens"] == MAX_TOKENS_LIMIT


# Listing judgments

def test_list_newest_first(listing):
    client, created = listing

    response = client.get("/v1/judgments")

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["next_cursor"] is None
    assert [item["id"] for item in body["data"]] == [item["id"] for item in reversed(created)]
    newest = body["data"][0]
    assert newest["judgment"] == created[-1]["judgment"]
    assert newest["usage"] == created[-1]["usage"]
    assert newest["text"] == created[-1]["text"]
    assert "trace" not in newest


@pytest.mark.parametrize("flagged", [True, False])
def test_list_filters_flagged(listing, flagged):
    client, created = listing
    expected = [body["id"] for body in reversed(created) if body["judgment"]["flagged"] is flagged]

    ids = list_ids(client, flagged=str(flagged).lower())

    assert ids == expected


def test_list_filters_min_score(listing):
    client, created = listing
    scores = {body["id"]: body["judgment"]["constraints"]["decidability"]["score"] for body in created}
    bound = sorted(scores.values())[2]  # the median, so the filter keeps some judgments and drops others
    expected = [body["id"] for body in reversed(created) if scores[body["id"]] >= bound]

    ids = list_ids(client, constraint="decidability", min_score=bound)

    assert len(expected) == 3
    assert ids == expected


def test_list_filters_max_score(listing):
    client, created = listing
    scores = {body["id"]: body["judgment"]["constraints"]["decidability"]["score"] for body in created}
    bound = sorted(scores.values())[2]
    expected = [body["id"] for body in reversed(created) if scores[body["id"]] <= bound]

    ids = list_ids(client, constraint="decidability", max_score=bound)

    assert len(expected) == 3
    assert ids == expected


def test_list_filters_score_range(listing):
    client, created = listing
    scores = sorted(body["judgment"]["constraints"]["decidability"]["score"] for body in created)
    low, high = scores[1], scores[3]
    expected = [body["id"] for body in reversed(created)
                if low <= body["judgment"]["constraints"]["decidability"]["score"] <= high]

    ids = list_ids(client, constraint="decidability", min_score=low, max_score=high)

    assert len(expected) == 3
    assert ids == expected


@pytest.mark.parametrize("passed", [True, False])
def test_list_filters_constraint_passed(listing, passed):
    client, created = listing
    expected = [body["id"] for body in reversed(created)
                if body["judgment"]["constraints"]["decidability"]["passed"] is passed]

    ids = list_ids(client, constraint="decidability", passed=str(passed).lower())

    assert expected, "the listing seeds no longer give both outcomes for decidability"
    assert ids == expected


def test_list_filters_since_until(listing):
    client, created = listing
    middle = created[2]["created_at"]
    newest_first = [body["id"] for body in reversed(created)]

    assert list_ids(client, since=middle) == newest_first[:3]
    assert list_ids(client, until=middle) == newest_first[3:]
    assert list_ids(client, since=created[1]["created_at"], until=created[3]["created_at"]) == newest_first[2:4]


def test_list_accepts_other_timezones(listing):
    client, created = listing

    # 1970-01-01 01:00 at +01:00 is the Unix epoch, so every judgment is newer.
    ids = list_ids(client, since="1970-01-01T01:00:00+01:00")

    assert len(ids) == len(created)


@pytest.mark.parametrize("name", ["since", "until"])
def test_list_rejects_naive_time(listing, name):
    client, _ = listing

    response = client.get("/v1/judgments", params={name: "2026-01-01T00:00:00"})

    assert_error(response, 422, param=name, code="invalid_value",
                 fragments=(name, "2026-01-01T00:00:00", "timezone"))


def test_list_pages_with_cursor(listing):
    client, created = listing
    pages, cursor = [], None

    for _ in range(len(created)):
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        response = client.get("/v1/judgments", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append([item["id"] for item in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert [len(page) for page in pages] == [2, 2, 1]
    seen = [judgment_id for page in pages for judgment_id in page]
    assert len(set(seen)) == len(seen)
    assert seen == [body["id"] for body in reversed(created)]


def test_list_pages_keep_filters(listing):
    client, created = listing
    expected = [body["id"] for body in reversed(created) if body["judgment"]["flagged"]]

    first = client.get("/v1/judgments", params={"flagged": "true", "limit": 1}).json()
    rest = client.get("/v1/judgments", params={"flagged": "true", "limit": 100,
                                               "cursor": first["next_cursor"]}).json()

    assert [item["id"] for item in first["data"] + rest["data"]] == expected
    assert rest["next_cursor"] is None


def test_list_rejects_invalid_cursor(listing):
    client, _ = listing

    response = client.get("/v1/judgments", params={"cursor": "not-a-cursor"})

    assert_error(response, 422, param="cursor", code="invalid_value", fragments=("not-a-cursor",))


def test_list_rejects_unknown_constraint(listing):
    client, _ = listing

    response = client.get("/v1/judgments", params={"constraint": "honesty"})

    assert_error(response, 422, param="constraint", code="invalid_value", fragments=("honesty", *CONSTRAINTS))


@pytest.mark.parametrize("name, value", [("min_score", "0.5"), ("max_score", "0.5"), ("passed", "true")])
def test_verdict_filter_needs_constraint(listing, name, value):
    client, _ = listing

    response = client.get("/v1/judgments", params={name: value})

    assert_error(response, 422, param=name, code="invalid_value", fragments=(name, "add constraint="))


def test_list_rejects_inverted_range(listing):
    client, _ = listing

    response = client.get("/v1/judgments", params={"constraint": "causality", "min_score": 0.9, "max_score": 0.1})

    assert_error(response, 422, param="min_score", code="invalid_value", fragments=("0.9", "0.1"))


@pytest.mark.parametrize("params, param, fragment", [
    ({"limit": 0}, "limit", "greater than or equal to 1"),
    ({"limit": 101}, "limit", "less than or equal to 100"),
    ({"limit": "ten"}, "limit", "valid integer"),
    ({"min_score": 1.5, "constraint": "causality"}, "min_score", "less than or equal to 1"),
    ({"passed": "maybe", "constraint": "causality"}, "passed", "valid boolean"),
    ({"since": "yesterday"}, "since", "valid datetime"),
    ({"cursor": "c" * 65}, "cursor", "at most 64 characters"),
], ids=["limit-0", "limit-101", "limit-text", "min-score-above-1", "passed-text", "since-text", "cursor-too-long"])
def test_list_rejects_invalid_query(listing, params, param, fragment):
    client, _ = listing

    response = client.get("/v1/judgments", params=params)

    assert_error(response, 422, param=param, code="invalid_value", fragments=(param, fragment))


# Request validation

VALIDATION_CASES = [
    ("prompt-number", {"prompt": 5}, "prompt", ("prompt", "valid string")),
    ("max-tokens-text", {"prompt": "hi", "max_tokens": "many"}, "max_tokens", ("max_tokens", "valid integer")),
    ("max-tokens-fraction", {"prompt": "hi", "max_tokens": 2.5}, "max_tokens", ("max_tokens", "valid integer")),
    ("max-tokens-boolean", {"prompt": "hi", "max_tokens": True}, "max_tokens", ("max_tokens", "valid integer")),
    ("temperature-text", {"prompt": "hi", "temperature": "hot"}, "temperature", ("temperature", "valid number")),
    ("top-p-list", {"prompt": "hi", "top_p": [0.5]}, "top_p", ("top_p", "valid number")),
    ("seed-text", {"prompt": "hi", "seed": "lucky"}, "seed", ("seed", "valid integer")),
    ("stop-number", {"prompt": "hi", "stop": 5}, "stop", ("stop", "valid list")),
    ("stop-item-null", {"prompt": "hi", "stop": [None]}, "stop.0", ("stop.0", "valid string")),
    ("metadata-list", {"prompt": "hi", "metadata": ["a"]}, "metadata", ("metadata", "valid dictionary")),
    ("messages-string", {"messages": "hi"}, "messages", ("messages", "valid list")),
    ("message-string", {"messages": ["hi"]}, "messages.0", ("messages.0", "valid dictionary")),
    ("unknown-field", {"prompt": "hi", "temprature": 1}, "temprature", ("temprature", "Extra inputs")),
    ("unknown-message-field", {"messages": [{"role": "user", "content": "a", "name": "x"}]}, "messages.0.name",
     ("messages.0.name", "Extra inputs")),
    ("prompt-and-messages", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "body",
     ("exactly one of", "prompt", "messages")),
    ("no-input", {"max_tokens": 4}, "body", ("exactly one of", "prompt", "messages")),
    ("empty-object", {}, "body", ("exactly one of",)),
    ("empty-prompt", {"prompt": ""}, "prompt", ("prompt", "empty")),
    ("whitespace-prompt", {"prompt": " \n\t "}, "prompt", ("prompt", "whitespace")),
    ("empty-messages", {"messages": []}, "messages", ("messages", "at least 1")),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role",
     ("messages.0.role", "'system', 'user' or 'assistant'")),
    ("missing-content", {"messages": [{"role": "user"}]}, "messages.0.content", ("messages.0.content", "required")),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, "max_tokens",
     ("max_tokens", "greater than or equal to 1")),
    ("max-tokens-negative", {"prompt": "hi", "max_tokens": -3}, "max_tokens",
     ("max_tokens", "greater than or equal to 1")),
    ("max-tokens-over-limit", {"prompt": "hi", "max_tokens": MAX_TOKENS_LIMIT + 1}, "max_tokens",
     ("max_tokens", f"is {MAX_TOKENS_LIMIT + 1}", f"limit of {MAX_TOKENS_LIMIT}")),
    ("max-tokens-huge", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens",
     (str(10**30), f"limit of {MAX_TOKENS_LIMIT}")),
    ("temperature-negative", {"prompt": "hi", "temperature": -0.1}, "temperature",
     ("temperature", "greater than or equal to 0")),
    ("temperature-above-2", {"prompt": "hi", "temperature": 2.5}, "temperature",
     ("temperature", "less than or equal to 2")),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, "top_p", ("top_p", "greater than 0")),
    ("top-p-above-1", {"prompt": "hi", "top_p": 1.5}, "top_p", ("top_p", "less than or equal to 1")),
    ("seed-negative", {"prompt": "hi", "seed": -1}, "seed", ("seed", "greater than or equal to 0")),
    ("seed-above-int64", {"prompt": "hi", "seed": 2**63}, "seed", ("seed", str(2**63 - 1))),
    ("five-stops", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", ("at most 4", "got 5")),
    ("empty-stop", {"prompt": "hi", "stop": ["a", ""]}, "stop", ("stop", "empty")),
    ("long-stop", {"prompt": "hi", "stop": ["s" * 65]}, "stop", ("at most 64", "got 65")),
    ("metadata-17-keys", {"prompt": "hi", "metadata": {f"key{i}": "v" for i in range(17)}}, "metadata",
     ("at most 16", "got 17")),
    ("metadata-number-value", {"prompt": "hi", "metadata": {"team": 7}}, "metadata.team",
     ("metadata.team", "valid string")),
    ("metadata-empty-key", {"prompt": "hi", "metadata": {"": "v"}}, "metadata", ("metadata key", "1 to 64")),
    ("metadata-long-value", {"prompt": "hi", "metadata": {"note": "n" * 513}}, "metadata",
     ("note", "513", "512")),
]


@pytest.mark.parametrize("body, param, fragments", [case[1:] for case in VALIDATION_CASES],
                         ids=[case[0] for case in VALIDATION_CASES])
def test_generate_rejects_invalid_body(shared_client, body, param, fragments):
    response = shared_client.post("/v1/generate", json=body)

    assert_error(response, 422, param=param, code="invalid_value", fragments=fragments)


@pytest.mark.parametrize("raw", [b'{"prompt": "hi",', b"{prompt: 'hi'}", b"\xff\xfe"],
                         ids=["truncated", "single-quotes", "not-utf8"])
def test_malformed_json_is_422(shared_client, raw):
    response = shared_client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})

    assert_error(response, 422, param="body", code="invalid_value", fragments=("not valid JSON", "JSON object"))


@pytest.mark.parametrize("raw", [b"[]", b'"hi"', b"42", b"null"], ids=["list", "string", "number", "null"])
def test_non_object_body_is_422(shared_client, raw):
    response = shared_client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})

    assert_error(response, 422, param="body", code="invalid_value", fragments=("valid dictionary",))


@pytest.mark.parametrize("raw, param, fragment", [
    (b'{"prompt": "caf\\ud800"}', "prompt", "prompt has a lone surrogate at character 3"),
    (b'{"prompt": "hi", "stop": ["\\udfff"]}', "stop", "stop sequence has a lone surrogate"),
    (b'{"prompt": "hi", "metadata": {"\\ud800": "v"}}', "metadata", "metadata key has a lone surrogate"),
    (b'{"prompt": "hi", "metadata": {"k": "v\\udc00"}}', "metadata", "metadata value of 'k' has a lone surrogate"),
], ids=["prompt", "stop", "metadata-key", "metadata-value"])
def test_lone_surrogate_is_422(shared_client, raw, param, fragment):
    # httpx cannot encode a lone surrogate, so the bodies are raw bytes with JSON escapes such as \ud800.
    response = shared_client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})

    assert_error(response, 422, param=param, code="invalid_value", fragments=(fragment, "valid Unicode"))


@pytest.mark.parametrize("max_tokens", [4, MAX_TOKENS_LIMIT])
def test_prompt_over_context_is_400(client, tiny_model, max_tokens):
    prompt = "The capital of France is Paris. " * 12
    prompt_tokens = len(tiny_model.encode(prompt))
    assert prompt_tokens > TINY_CONTEXT

    response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": max_tokens})

    assert_error(response, 400, param="prompt", code="context_length_exceeded",
                 fragments=(f"prompt is {prompt_tokens} tokens", f"max_tokens is {max_tokens}",
                            f"context holds {TINY_CONTEXT} tokens"))


def test_prompt_plus_max_tokens_over_context(client, tiny_model):
    # The prompt fits the context alone, but not together with max_tokens.
    prompt = "The capital of France is Paris. " * 5
    prompt_tokens = len(tiny_model.encode(prompt))
    assert prompt_tokens + MAX_TOKENS_LIMIT > TINY_CONTEXT > prompt_tokens

    response = client.post("/v1/generate", json={"prompt": prompt, "max_tokens": MAX_TOKENS_LIMIT})

    assert_error(response, 400, param="prompt", code="context_length_exceeded",
                 fragments=(f"together {prompt_tokens + MAX_TOKENS_LIMIT}", str(TINY_CONTEXT)))


def test_rejected_requests_store_nothing(app, client):
    client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 0})
    client.post("/v1/generate", json={"prompt": "The capital of France is Paris. " * 12, "max_tokens": 4})

    assert judgment_count(app) == 0


def test_unknown_route_is_404(client):
    response = client.get("/v1/nothing-here")

    assert_error(response, 404, type="not_found_error", fragments=("Not Found",))


def test_wrong_method_is_405(client):
    response = client.delete("/v1/judgments")

    assert_error(response, 405, fragments=("Method Not Allowed",))


# Guards: audit store and queue

def test_store_failure_returns_no_text(app, client):
    before = generate(client, max_tokens=12, seed=11)
    count_before = judgment_count(app)
    # Dropping a table that every save writes to makes the commit fail inside the real store.
    with app.state.runtime.engine.begin() as connection:
        connection.execute(text("DROP TABLE verdicts"))

    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 12, "seed": 11})

    assert_error(response, 503, type="service_unavailable", code="audit_store_unavailable",
                 fragments=("audit store", "not returned"))
    assert response.headers["Retry-After"] == "5"
    assert "text" not in response.json()
    assert len(before["text"]) >= 4
    assert before["text"] not in response.json()["error"]["message"]
    assert judgment_count(app) == count_before


def test_full_queue_is_429(app, client, tiny_model):
    runtime = app.state.runtime
    runtime.worker.stop()
    # An unstarted worker never drains its queue, so one queued item keeps it full.
    full_worker = GenerationWorker(tiny_model, max_queue=1, retry_after_s=3)
    full_worker._queue.append(object())
    runtime.worker = full_worker

    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2})

    assert_error(response, 429, type="rate_limit_error", code="queue_full", fragments=("queue is full", "3 s"))
    assert response.headers["Retry-After"] == "3"
    assert judgment_count(app) == 0


# No input can produce a 500

FUZZ_BODIES = [
    b"[]", b'[{"prompt": "hi"}]', b'"prompt"', b"42", b"-1.5e308", b"null", b"true", b"",
    b'{"prompt": ["hi"]}', b'{"prompt": {"text": "hi"}}', b'{"prompt": null}', b'{"prompt": true}',
    b'{"messages": {"role": "user", "content": "hi"}}', b'{"messages": [["user", "hi"]]}',
    b'{"messages": [{"role": null, "content": "hi"}]}', b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": "hi", "max_tokens": 1e400}', b'{"prompt": "hi", "max_tokens": 99999999999999999999999999999}',
    b'{"prompt": "hi", "seed": 99999999999999999999999999999}', b'{"prompt": "hi", "seed": 1.5}',
    b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
    b'{"prompt": "hi", "temperature": -Infinity}', b'{"prompt": "hi", "temperature": "NaN"}',
    b'{"prompt": "hi", "max_tokens": 4, "temperature": 1e-300}', b'{"prompt": "hi", "max_tokens": 4, "temperature": 5e-324}',
    b'{"prompt": "hi", "top_p": "nan"}', b'{"prompt": "hi", "max_tokens": "1e3"}',
    b'{"prompt": "\\ud800"}', b'{"prompt": "\\udfff\\ud800 tail"}',
    b'{"prompt": "hi", "max_tokens": 2, "stop": ["\\ud800"]}',
    b'{"prompt": "hi", "stop": {"a": "b"}}', b'{"prompt": "hi", "metadata": {"k": null}}',
    b'{"prompt": "hi", "metadata": "tag"}', b'{"prompt": "hi", "prompt": 5}',
    '{"prompt": "h\u00e9llo \u4e16\u754c \U0001F600 \u202e", "max_tokens": 2}'.encode(),
    b'{"prompt": "\\u0000\\u0001", "max_tokens": 2}',
    b'{"messages": [{"role": "user", "content": ""}], "max_tokens": 2}',
    b'{"prompt": "hi", "max_tokens": 2, "metadata": {"\\u00e9": "\\u4e16"}}',
    b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"prompt": "hi"}' + b" " * 10 + b"garbage", b"\x00\x01\x02",
]


def test_no_body_causes_500(shared_client):
    statuses, stored_ids = {}, []
    for raw in FUZZ_BODIES:
        response = shared_client.post("/v1/generate", content=raw, headers={"Content-Type": "application/json"})
        statuses[raw[:60]] = response.status_code
        if response.status_code == 200:
            stored_ids.append(response.json()["id"])
        else:
            assert set(response.json()["error"]) == ERROR_FIELDS, raw[:60]

    server_errors = {raw: status for raw, status in statuses.items() if status >= 500}
    assert server_errors == {}
    assert len(statuses) >= 30
    # An accepted body must not store anything that breaks a later read.
    assert stored_ids
    for judgment_id in stored_ids:
        assert shared_client.get(f"/v1/judgments/{judgment_id}").status_code == 200
    assert shared_client.get("/v1/judgments", params={"limit": 100}).status_code == 200


@pytest.mark.parametrize("path", ["/v1/judgments/%00", "/v1/judgments/" + "x" * 2000, "/v1/judgments/%F0%9F%98%80",
                                  "/v1/judgments?limit=1e400", "/v1/judgments?since=9999999999999999999999",
                                  "/v1/judgments?min_score=nan&constraint=causality",
                                  "/v1/judgments?cursor=%FF%FE", "/v1/judgments?flagged=2"])
def test_no_query_causes_500(shared_client, path):
    response = shared_client.get(path)

    assert response.status_code < 500, response.text
    assert set(response.json()["error"]) == ERROR_FIELDS


def test_oversized_request_id_header(shared_client):
    response = shared_client.post("/v1/generate", json={"prompt": "hi", "max_tokens": 1},
                                  headers={"X-Request-ID": json.dumps({"id": "x" * 500})})

    assert response.status_code == 200
    assert len(response.headers["X-Request-ID"]) == 32


def test_list_rejects_reversed_time_range(listing):
    client, _ = listing

    response = client.get("/v1/judgments", params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"})

    assert_error(response, 422, param="since", code="invalid_value", fragments=("not before until",))


def test_list_naive_until_with_since(listing):
    client, _ = listing

    response = client.get("/v1/judgments", params={"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00"})

    assert_error(response, 422, param="until", code="invalid_value", fragments=("no timezone",))


def test_validation_error_shows_received_value(client):
    response = client.post("/v1/generate", json={"prompt": "hi", "temperature": -1})

    assert_error(response, 422, param="temperature", code="invalid_value",
                 fragments=("greater than or equal to 0", "(received -1)"))


# Constraint policies on the native route

def test_withhold_policy_hides_text_on_native_route(client):
    body = generate(client, policy={"decidability": {"min_score": 1.0, "action": "withhold"}})

    assert body["text"] is None
    assert body["finish_reason"] == "constraint"
    assert body["judgment"]["policy"]["withheld"] is True
    assert all(token["text"] is None for token in body["trace"]["output_tokens"])
    stored = client.get(f"/v1/judgments/{body['id']}").json()
    assert isinstance(stored["text"], str)
    assert stored["trace"]["output_tokens"][0]["text"] is not None


def test_native_response_names_its_producers(client, tiny_model):
    body = generate(client, seed=21, include_trace=False)

    assert body["seed"] == 21
    assert body["model_fingerprint"] == tiny_model.base.fingerprint
    assert body["heads_fingerprint"] == tiny_model.heads.fingerprint()
    assert "trace" not in body


@pytest.mark.parametrize(("policy", "param", "fragment"), [
    ({"honesty": {"min_score": 0.5, "action": "flag"}}, "policy", "'honesty', which the loaded heads do not score"),
    ({"causality": {"min_score": 0.5}}, "policy.causality.action", "Field required"),
    ({"causality": {"min_score": -0.1, "action": "stop"}}, "policy.causality.min_score", "greater than or equal to 0"),
])
def test_invalid_policy_is_422(client, policy, param, fragment):
    response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 2, "policy": policy})

    assert_error(response, 422, param=param, code="invalid_value", fragments=(fragment,))
