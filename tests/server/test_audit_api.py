"""The integrity log over HTTP on the tiny model: tree heads, the public key, proofs and admin erasure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.store import merkle
from server.store.integrity import SignedTreeHead, verify_head_signature
from tests.server.helpers import MAX_TOKENS_LIMIT, PROMPT, assert_error

@pytest.fixture
def client(tmp_path, tiny_model) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT)
    with TestClient(create_app(settings, tiny_model)) as client:
        yield client


def generate(client: TestClient, count: int) -> list[str]:
    ids = []
    for seed in range(count):
        response = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 3, "seed": seed})
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def test_tree_head_is_signed_with_published_key(client):
    generate(client, 3)

    head = client.get("/v1/audit/tree-head").json()
    key = client.get("/v1/audit/public-key").json()

    assert head["tree_size"] == 3
    assert key["algorithm"] == "Ed25519"
    assert head["key_id"] == key["key_id"]
    assert verify_head_signature(SignedTreeHead.from_dict(head), bytes.fromhex(key["public_key"]))


def test_inclusion_proof_leads_to_signed_root(client):
    ids = generate(client, 5)
    head = client.get("/v1/audit/tree-head").json()

    for judgment_id in ids:
        proof = client.get(f"/v1/judgments/{judgment_id}/proof").json()
        assert proof["tree_size"] == 5
        assert proof["root_hash"] == head["root_hash"]
        path = [bytes.fromhex(digest) for digest in proof["audit_path"]]
        assert merkle.verify_inclusion(bytes.fromhex(proof["leaf_hash"]), proof["leaf_index"], 5, path,
                                       bytes.fromhex(head["root_hash"]))


def test_consistency_proof_links_two_heads(client):
    generate(client, 2)
    old = client.get("/v1/audit/tree-head").json()
    generate(client, 3)
    new = client.get("/v1/audit/tree-head").json()

    body = client.get("/v1/audit/consistency", params={"first": old["tree_size"], "second": new["tree_size"]}).json()

    proof = [bytes.fromhex(digest) for digest in body["consistency_proof"]]
    assert merkle.verify_consistency(2, 5, bytes.fromhex(old["root_hash"]), bytes.fromhex(new["root_hash"]), proof)


def test_proof_errors(client):
    [judgment_id] = generate(client, 1)

    assert_error(client.get("/v1/judgments/nope/proof"), 404, type="not_found_error", param="judgment_id",
                 code="judgment_not_found")
    assert_error(client.get(f"/v1/judgments/{judgment_id}/proof", params={"tree_size": 9}), 422,
                 param="tree_size", code="invalid_value", fragments=("at most the log's size 1",))
    assert_error(client.get("/v1/audit/consistency", params={"first": 2, "second": 1}), 422, param="second",
                 code="invalid_value", fragments=("0 < first <= second <= 1",))


def test_admin_erase_keeps_proof(client):
    [judgment_id] = generate(client, 1)
    proof = client.get(f"/v1/judgments/{judgment_id}/proof").json()
    response = client.post(f"/v1/admin/judgments/{judgment_id}/erase", json={"reason": "privacy request", "erased_by": "dpo"})

    assert response.status_code == 200, response.text
    assert response.json()["erased_by"] == "dpo"
    record = client.get(f"/v1/judgments/{judgment_id}").json()
    assert record["text"] == ""
    assert record["input"] == {}
    assert record["erasure"]["erased_by"] == "dpo"
    assert record["erasure"]["reason"] == "privacy request"
    assert client.get(f"/v1/judgments/{judgment_id}/proof").json() == proof
    again = client.post(f"/v1/admin/judgments/{judgment_id}/erase", json={"reason": "again", "erased_by": "dpo"})
    assert_error(again, 409, param="judgment_id", code="already_erased")

