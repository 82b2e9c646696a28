"""Auditor queries over HTTP on the tiny model: the new filters, fields, the export and the daily stats."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.store import StoreUnavailableError
from tests.conftest import CONSTRAINTS
from tests.server.helpers import PROMPT, assert_error, make_app

CSV_JUDGMENT_COLUMNS = ["id", "created_at", "status", "kind", "model", "heads", "finish_reason", "flagged",
                        "prompt_tokens", "completion_tokens", "metadata"]
LIST_ITEM_FIELDS = ["id", "kind", "status", "created_at", "model", "heads", "text", "finish_reason", "flagged",
                    "usage", "judgment", "metadata"]


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_model) -> Iterator[tuple[TestClient, list[dict]]]:
    """A client whose store contains four generations and one score, with the response bodies oldest first."""
    app = make_app(tmp_path_factory.mktemp("audited"), tiny_model)
    requests = [
        ("/v1/generate", {"prompt": PROMPT, "metadata": {"team": "docs", "env": "prod"}}),
        ("/v1/generate", {"prompt": "Water boils at", "metadata": {"team": "docs", "env": "staging"}}),
        ("/v1/generate", {"prompt": PROMPT, "metadata": {"team": "ops", "ticket": "a:b"}}),
        ("/v1/generate", {"prompt": "Cats are", "metadata": {}}),
        ("/v1/score", {"messages": [{"role": "user", "content": "Where is Paris?"}],
                       "response": "Paris is in France.", "metadata": {"team": "docs"}}),
    ]
    with TestClient(app, raise_server_exceptions=False) as client:
        created = []
        for path, body in requests:
            extra = {"max_tokens": 6, "seed": len(created)} if path == "/v1/generate" else {}
            response = client.post(path, json=body | extra)
            assert response.status_code == 200, response.text
            created.append(response.json())
        yield client, created


def get_list(client: TestClient, params) -> dict:
    response = client.get("/v1/judgments", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def list_ids(client: TestClient, params) -> list[str]:
    return [item["id"] for item in get_list(client, params)["data"]]


def newest_first_ids(created: list[dict], keep=lambda body: True) -> list[str]:
    return [body["id"] for body in reversed(created) if keep(body)]


def export(client: TestClient, params) -> str:
    response = client.get("/v1/judgments/export", params=params)
    assert response.status_code == 200, response.text
    return response.text


# Filters

def test_filter_model_and_heads(audited):
    client, created = audited
    model, heads = created[0]["model"], created[0]["heads"]

    assert list_ids(client, {"model": model}) == newest_first_ids(created)
    assert list_ids(client, {"heads": heads}) == newest_first_ids(created)
    assert list_ids(client, {"model": model + "-other"}) == []
    assert list_ids(client, {"heads": heads + "-other"}) == []


def test_filter_metadata_repeated(audited):
    client, created = audited
    docs = [created[4]["id"], created[1]["id"], created[0]["id"]]

    assert list_ids(client, {"metadata": "team:docs"}) == docs
    assert list_ids(client, [("metadata", "team:docs"), ("metadata", "env:prod")]) == [created[0]["id"]]
    assert list_ids(client, [("metadata", "team:docs"), ("metadata", "env:dev")]) == []


def test_filter_metadata_value_with_colon(audited):
    client, created = audited

    assert list_ids(client, {"metadata": "ticket:a:b"}) == [created[2]["id"]]


def test_filter_text_searches_prompt_and_output(audited):
    client, created = audited

    assert list_ids(client, {"q": "WATER"}) == [created[1]["id"]]
    assert list_ids(client, {"q": "paris is in"}) == [created[4]["id"]]
    assert list_ids(client, {"q": "capital of france"}) == [created[2]["id"], created[0]["id"]]


def test_filters_combine(audited):
    client, created = audited

    params = {"metadata": "team:docs", "q": "capital", "kind": "generation"}

    assert list_ids(client, params) == [created[0]["id"]]


def test_order_oldest_pages_with_cursor(audited):
    client, created = audited
    pages, cursor = [], None

    for _ in range(len(created)):
        body = get_list(client, {"order": "oldest", "limit": 2} | ({"cursor": cursor} if cursor else {}))
        pages.append([item["id"] for item in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert [len(page) for page in pages] == [2, 2, 1]
    assert [judgment_id for page in pages for judgment_id in page] == [body["id"] for body in created]


def test_order_newest_is_default(audited):
    client, _ = audited

    assert list_ids(client, {"order": "newest"}) == list_ids(client, {})


# Fields

def test_fields_select_item_keys(audited):
    client, created = audited

    body = get_list(client, {"fields": "id,created_at,judgment"})

    assert body["next_cursor"] is None
    assert [item["id"] for item in body["data"]] == newest_first_ids(created)
    for item in body["data"]:
        assert list(item) == ["id", "created_at", "judgment"]
    full = get_list(client, {})["data"]
    assert body["data"][0]["judgment"] == full[0]["judgment"]


def test_fields_always_include_id(audited):
    client, _ = audited

    body = get_list(client, {"fields": " text , flagged", "limit": 1})

    assert list(body["data"][0]) == ["id", "text", "flagged"]


def test_fields_reject_unknown_name(audited):
    client, _ = audited

    response = client.get("/v1/judgments", params={"fields": "id,trace"})

    assert_error(response, 422, param="fields", code="invalid_value",
                 fragments=("unknown field 'trace'", "valid fields: " + ", ".join(LIST_ITEM_FIELDS)))


@pytest.mark.parametrize("fields", ["", "id,,text", "id,"])
def test_fields_reject_empty_name(audited, fields):
    client, _ = audited

    response = client.get("/v1/judgments", params={"fields": fields})

    assert_error(response, 422, param="fields", code="invalid_value",
                 fragments=(f"fields={fields!r}", "empty field name", "e.g. fields=id,created_at"))


# Filter errors

@pytest.mark.parametrize("value", ["team", ":docs", "teamdocs"])
def test_metadata_rejects_missing_separator(audited, value):
    client, _ = audited

    response = client.get("/v1/judgments", params={"metadata": value})

    assert_error(response, 422, param="metadata", code="invalid_value",
                 fragments=(f"metadata={value!r}", "is not key:value", "e.g. metadata=team:docs"))


def test_metadata_rejects_repeated_key(audited):
    client, _ = audited

    response = client.get("/v1/judgments", params=[("metadata", "team:docs"), ("metadata", "team:ops")])

    assert_error(response, 422, param="metadata", code="invalid_value", fragments=("'team'", "given twice"))


def test_metadata_rejects_too_many_pairs(audited):
    client, _ = audited

    response = client.get("/v1/judgments", params=[("metadata", f"k{i}:v") for i in range(17)])

    assert_error(response, 422, param="metadata", code="invalid_value", fragments=("17 metadata filters", "16"))


@pytest.mark.parametrize("params, param, fragment", [
    ({"order": "random"}, "order", "'newest' or 'oldest'"),
    ({"q": ""}, "q", "at least 1 character"),
    ({"q": "x" * 513}, "q", "at most 512 characters"),
    ({"model": "m" * 256}, "model", "at most 255 characters"),
], ids=["order", "q-empty", "q-too-long", "model-too-long"])
def test_list_rejects_invalid_new_parameters(audited, params, param, fragment):
    client, _ = audited

    response = client.get("/v1/judgments", params=params)

    assert_error(response, 422, param=param, code="invalid_value", fragments=(param, fragment))


# Export

def test_export_jsonl_matches_list(audited):
    client, created = audited

    response = client.get("/v1/judgments/export", params={"format": "jsonl"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="judgments-')
    assert disposition.endswith('.jsonl"')
    lines = response.text.splitlines()
    assert [json.loads(line) for line in lines] == get_list(client, {})["data"]
    assert [json.loads(line)["id"] for line in lines] == newest_first_ids(created)


def test_export_jsonl_is_default_format(audited):
    client, _ = audited

    assert export(client, {}) == export(client, {"format": "jsonl"})


def test_export_jsonl_with_trace(audited):
    client, created = audited

    lines = export(client, {"include_trace": "true", "order": "oldest"}).splitlines()

    items = [json.loads(line) for line in lines]
    assert [item["id"] for item in items] == [body["id"] for body in created]
    for item, body in zip(items, created):
        assert item["trace"] == body["trace"]


def test_export_applies_filters(audited):
    client, created = audited

    lines = export(client, {"metadata": "team:docs", "kind": "generation", "order": "oldest"}).splitlines()

    assert [json.loads(line)["id"] for line in lines] == [created[0]["id"], created[1]["id"]]


def test_export_csv_rows(audited):
    client, created = audited

    response = client.get("/v1/judgments/export", params={"format": "csv", "order": "oldest"})

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].endswith('.csv"')
    rows = list(csv.DictReader(io.StringIO(response.text, newline="")))
    score_columns = [f"{name}_{field}" for name in CONSTRAINTS for field in ("score", "passed")]
    assert list(rows[0]) == CSV_JUDGMENT_COLUMNS + score_columns
    assert [row["id"] for row in rows] == [body["id"] for body in created]
    for row, body in zip(rows, created):
        stored = client.get(f"/v1/judgments/{body['id']}").json()
        assert row["created_at"] == stored["created_at"]
        assert row["status"] == "completed"
        assert row["kind"] == body["kind"]
        assert row["model"] == body["model"]
        assert row["heads"] == body["heads"]
        assert row["finish_reason"] == body["finish_reason"]
        assert row["flagged"] == str(body["judgment"]["flagged"]).lower()
        assert int(row["prompt_tokens"]) == body["usage"]["prompt_tokens"]
        assert int(row["completion_tokens"]) == body["usage"]["completion_tokens"]
        assert json.loads(row["metadata"]) == stored["metadata"]
        for name in CONSTRAINTS:
            verdict = body["judgment"]["constraints"][name]
            assert float(row[f"{name}_score"]) == verdict["score"]
            assert row[f"{name}_passed"] == str(verdict["passed"]).lower()


def test_export_csv_of_no_match_has_header_only(audited):
    client, _ = audited

    text = export(client, {"format": "csv", "model": "absent"})

    assert text.count("\r\n") == 1
    assert text.startswith("id,created_at,status,")


def test_export_rejects_unknown_format(audited):
    client, _ = audited

    response = client.get("/v1/judgments/export", params={"format": "xml"})

    assert_error(response, 422, param="format", code="invalid_value", fragments=("'jsonl' or 'csv'", "'xml'"))


def test_export_rejects_trace_in_csv(audited):
    client, _ = audited

    response = client.get("/v1/judgments/export", params={"format": "csv", "include_trace": "true"})

    assert_error(response, 422, param="include_trace", code="invalid_value",
                 fragments=("include_trace=true", "format=jsonl"))


def test_export_checks_filters(audited):
    client, _ = audited

    response = client.get("/v1/judgments/export", params={"metadata": "team"})

    assert_error(response, 422, param="metadata", code="invalid_value", fragments=("is not key:value",))


def test_export_store_failure_is_503(audited, monkeypatch):
    client, _ = audited

    def unavailable(query, batch_size=500, with_trace=False):
        raise StoreUnavailableError("The audit store could not export judgments: OperationalError: gone")
        yield

    monkeypatch.setattr(client.app.state.runtime.store, "export", unavailable)
    response = client.get("/v1/judgments/export")

    assert_error(response, 503, type="service_unavailable", code="audit_store_unavailable")


# Stats

def expected_stats(items: list[dict], constraint: str | None = None) -> list[dict]:
    judgments, passed = Counter(), Counter()
    for item in items:
        day = item["created_at"][:10]
        for name, verdict in item["judgment"]["constraints"].items():
            if constraint in (None, name):
                judgments[day, name] += 1
                passed[day, name] += verdict["passed"]
    return [{"day": day, "constraint": name, "judgments": judgments[day, name], "passed": passed[day, name],
             "pass_rate": passed[day, name] / judgments[day, name]} for day, name in sorted(judgments)]


def test_stats_per_day_and_constraint(audited):
    client, _ = audited

    response = client.get("/v1/judgments/stats")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["data"] == expected_stats(get_list(client, {})["data"])
    assert sum(row["judgments"] for row in body["data"]) == 5 * len(CONSTRAINTS)


def test_stats_apply_filters(audited):
    client, _ = audited

    params = {"metadata": "team:docs", "constraint": "causality"}
    body = client.get("/v1/judgments/stats", params=params).json()

    assert body["data"] == expected_stats(get_list(client, params)["data"], "causality")
    assert sum(row["judgments"] for row in body["data"]) == 3


def test_stats_of_no_match_is_empty(audited):
    client, _ = audited

    body = client.get("/v1/judgments/stats", params={"model": "absent"}).json()

    assert body == {"object": "list", "data": []}


def test_stats_reject_invalid_filter(audited):
    client, _ = audited

    response = client.get("/v1/judgments/stats", params={"passed": "true"})

    assert_error(response, 422, param="passed", code="invalid_value", fragments=("add constraint=",))


def test_stats_route_is_not_a_judgment_id(audited):
    client, _ = audited

    assert client.get("/v1/judgments/stats").status_code == 200
    assert client.get("/v1/judgments/export").status_code == 200
    assert_error(client.get("/v1/judgments/statistics"), 404, type="not_found_error", param="judgment_id",
                 code="judgment_not_found")
