"""POST /v1/score and `tracehead score` on the tiny model."""

import json

import pytest
from fastapi.testclient import TestClient

from models.decode import ConstraintModel
from models.heads import save_checkpoint
from server.app import create_app
from server.cli import main
from server.settings import Settings
from server.store import AuditStore, JudgmentQuery, create_engine_for
from tests.conftest import CONSTRAINTS, TINY_CONTEXT, build_tiny_base, build_tiny_heads

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def client(tmp_path, tiny_model: ConstraintModel):
    app = create_app(Settings(data_dir=tmp_path, max_tokens_limit=32), tiny_model)
    with TestClient(app) as test_client:
        yield test_client


def test_score_returns_judgment_and_trace(client, tiny_model):
    response = client.post("/v1/score", json={"messages": QUESTION, "response": "The capital is Paris.",
                                              "metadata": {"audit": "re-judge"}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["kind"] == "score"
    assert body["finish_reason"] == "supplied"
    assert body["text"] == "The capital is Paris."
    response_ids = tiny_model.base.tokenizer("The capital is Paris.", add_special_tokens=False).input_ids
    assert body["usage"]["completion_tokens"] == len(response_ids) + 1
    assert [t["token_id"] for t in body["trace"]["output_tokens"]][:-1] == response_ids
    assert set(body["judgment"]["constraints"]) == set(CONSTRAINTS)
    assert all(t["logprob"] <= 0 for t in body["trace"]["output_tokens"])


def test_scored_judgment_is_stored(client):
    body = client.post("/v1/score", json={"prompt": "Water boils at", "response": " one hundred degrees.",
                                          "end_of_turn": False}).json()
    stored = client.get(f"/v1/judgments/{body['id']}").json()
    assert stored["trace"] == body["trace"]
    assert stored["kind"] == "score"
    assert stored["parameters"]["end_of_turn"] is False
    assert stored["input"] == {"prompt": "Water boils at"}

    client.post("/v1/generate", json={"prompt": "Water boils at", "max_tokens": 2})
    scored = client.get("/v1/judgments", params={"kind": "score"}).json()["data"]
    generated = client.get("/v1/judgments", params={"kind": "generation"}).json()["data"]
    assert [item["id"] for item in scored] == [body["id"]]
    assert len(generated) == 1
    assert generated[0]["kind"] == "generation"


@pytest.mark.parametrize("payload, param", [
    ({"messages": QUESTION}, "response"),
    ({"messages": QUESTION, "response": ""}, "response"),
    ({"response": "Paris."}, "body"),
    ({"prompt": "hi", "messages": QUESTION, "response": "Paris."}, "body"),
    ({"prompt": "hi", "response": "Paris.", "temperature": 0}, "temperature"),
    ({"prompt": "hi", "response": "Paris.", "end_of_turn": "maybe"}, "end_of_turn"),
    ({"prompt": "hi", "response": "Paris.", "end_of_turn": 0}, "end_of_turn"),
])
def test_score_rejects_invalid_body(client, payload, param):
    response = client.post("/v1/score", json=payload)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


def test_score_rejects_overlong_response(client):
    response = client.post("/v1/score", json={"prompt": "hi", "response": "Paris is a city. " * TINY_CONTEXT})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "response"
    assert str(TINY_CONTEXT) in error["message"]
    assert "Shorten the prompt or the response." in error["message"]


def test_cli_score_commits_judgment(tmp_path, monkeypatch, capsys):
    base = build_tiny_base()
    base.model.save_pretrained(tmp_path / "model")
    base.tokenizer.save_pretrained(tmp_path / "model")
    save_checkpoint(tmp_path / "heads", build_tiny_heads(base))
    monkeypatch.setenv("TRACEHEAD_MODEL", str(tmp_path / "model"))
    monkeypatch.setenv("TRACEHEAD_HEADS_PATH", str(tmp_path / "heads"))
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path / "data"))

    assert main(["score", "--prompt", "Water boils at", "--response", " one hundred degrees.",
                 "--metadata", "case", "cli"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "score"
    assert "trace" not in printed
    store = AuditStore(create_engine_for(f"sqlite:///{tmp_path / 'data' / 'tracehead.db'}"))
    record = store.get(printed["id"])
    assert record.metadata == {"case": "cli"}
    assert record.output == " one hundred degrees."
    assert [item.id for item in store.list(JudgmentQuery(kind="score"), 10, None).items] == [printed["id"]]


def test_cli_score_reports_invalid_input(capsys):
    assert main(["score", "--prompt", "Water boils at", "--response", ""]) == 2

    error = capsys.readouterr().err
    assert error.startswith("error: invalid input: response:")
    assert "pydantic" not in error


def test_score_rejects_lone_surrogate(client):
    response = client.post("/v1/score", content=b'{"prompt": "hi", "response": "caf\\ud800"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "response"
    assert "unicode" in response.json()["error"]["message"]
