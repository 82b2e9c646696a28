"""The integrity log over HTTP on the tiny model: tree heads, the public key, proofs and admin erasure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

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



# Verification of one judgment

def test_verification_recomputes_leaf_against_latest_head(client):
    ids = generate(client, 3)

    body = client.get(f"/v1/judgments/{ids[1]}/verification").json()

    head = client.get("/v1/audit/tree-head").json()
    assert body == {"judgment_id": ids[1], "status": "verified", "reason": None, "erased": False, "leaf_index": 1,
                    "tree_head": head, "checks": {"record": True, "inclusion": True, "signature": True}}


def test_verification_against_an_older_signed_head(client):
    [first] = generate(client, 1)
    old = client.get("/v1/audit/tree-head").json()
    generate(client, 2)

    body = client.get(f"/v1/judgments/{first}/verification", params={"tree_size": old["tree_size"]}).json()

    assert body["status"] == "verified"
    assert body["tree_head"] == old


def test_verification_of_a_changed_record_fails(client):
    ids = generate(client, 2)
    with client.app.state.runtime.engine.begin() as connection:
        connection.execute(text("UPDATE judgments SET output = 'The capital of France is Lyon.' WHERE id = :id"),
                           {"id": ids[0]})

    body = client.get(f"/v1/judgments/{ids[0]}/verification").json()

    assert body["status"] == "failed"
    assert body["checks"] == {"record": False, "inclusion": True, "signature": True}
    assert body["reason"] == "the judgment (leaf 0): its prompt, output or trace differs from what was logged"
    assert client.get(f"/v1/judgments/{ids[1]}/verification").json()["status"] == "verified"


def test_verification_of_an_erased_judgment_passes(client):
    [judgment_id] = generate(client, 1)
    client.post(f"/v1/admin/judgments/{judgment_id}/erase", json={"reason": "privacy request", "erased_by": "dpo"})

    body = client.get(f"/v1/judgments/{judgment_id}/verification").json()

    assert body["status"] == "verified"
    assert body["erased"] is True


def test_verification_of_a_started_judgment_is_pending(client):
    with client.app.state.runtime.engine.begin() as connection:
        connection.execute(text("CREATE TRIGGER fail_update BEFORE UPDATE ON judgments "
                                "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"))
    with client.stream("POST", "/v1/generate", json={"prompt": PROMPT, "max_tokens": 2, "stream": True}) as response:
        response.read()
    [started] = client.get("/v1/judgments", params={"status": "started"}).json()["data"]

    body = client.get(f"/v1/judgments/{started['id']}/verification").json()

    assert body["status"] == "pending"
    assert body["leaf_index"] is None
    assert body["checks"] == {"record": None, "inclusion": None, "signature": None}
    assert "no leaf in the log yet" in body["reason"]


def test_verification_errors(client):
    [judgment_id] = generate(client, 1)

    assert_error(client.get("/v1/judgments/nope/verification"), 404, type="not_found_error", param="judgment_id",
                 code="judgment_not_found")
    assert_error(client.get(f"/v1/judgments/{judgment_id}/verification", params={"tree_size": 7}), 422,
                 param="tree_size", code="invalid_value",
                 fragments=("no tree head was signed at size 7", "the latest signed head has size 1"))


def test_verification_of_another_tenants_judgment_is_404(tmp_path, tiny_model):
    settings = Settings(data_dir=tmp_path, max_tokens_limit=MAX_TOKENS_LIMIT, auth="keys")
    with TestClient(create_app(settings, tiny_model)) as client:
        keys = client.app.state.runtime.keys
        writer = {"Authorization": f"Bearer {keys.create('b-writer', 'b', ['generate'])[1]}"}
        readers = {tenant: {"Authorization": f"Bearer {keys.create(f'{tenant}-reader', tenant, ['audit:read'])[1]}"}
                   for tenant in ("a", "b")}
        judgment_id = client.post("/v1/generate", headers=writer, json={"prompt": PROMPT, "max_tokens": 2}).json()["id"]

        theirs = client.get(f"/v1/judgments/{judgment_id}/verification", headers=readers["a"])
        own = client.get(f"/v1/judgments/{judgment_id}/verification", headers=readers["b"])

    assert_error(theirs, 404, type="not_found_error", param="judgment_id", code="judgment_not_found")
    assert own.json()["status"] == "verified"
