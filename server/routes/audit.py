"""The integrity log over HTTP: signed tree heads, the public key, proofs, and erasure for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from server.auth import AuditAdmin, AuditReader
from server.dependencies import RuntimeDep
from server.errors import ApiError
from server.store.audit_log import JudgmentNotFoundError, ProofRangeError
from server.store.integrity import utc_iso

router = APIRouter(tags=["audit"])


@router.get("/v1/audit/public-key")
async def public_key(runtime: RuntimeDep, caller: AuditReader) -> dict:
    """Return the Ed25519 key that signs tree heads; auditors check saved heads with it."""
    signer = runtime.integrity.signer
    return {"algorithm": "Ed25519", "public_key": signer.public_key_bytes.hex(), "key_id": signer.key_id}


@router.get("/v1/audit/tree-head")
async def tree_head(runtime: RuntimeDep, caller: AuditReader) -> dict:
    """Return the latest signed tree head, signing a new one when the log has grown since the last."""
    head = await run_in_threadpool(runtime.integrity.tree_head)
    return head.as_dict() | {"algorithm": "Ed25519"}


@router.get("/v1/audit/consistency")
async def consistency(runtime: RuntimeDep, caller: AuditReader, first: Annotated[int, Query(ge=1)],
                      second: Annotated[int, Query(ge=1)]) -> dict:
    """RFC 6962 consistency proof between the trees of ``first`` and ``second`` leaves."""
    try:
        proof = await run_in_threadpool(runtime.integrity.consistency_proof, first, second)
    except ProofRangeError as exc:
        raise ApiError(422, str(exc), param="second", code="invalid_value") from None
    return {"first": first, "second": second, "consistency_proof": proof}


@router.get("/v1/judgments/{judgment_id}/proof")
async def inclusion_proof(judgment_id: str, runtime: RuntimeDep, caller: AuditReader,
                          tree_size: Annotated[int | None, Query(ge=1, description=(
                              "Size of the tree to prove inclusion in; default the current size."))] = None) -> dict:
    """RFC 6962 inclusion proof of the judgment's leaf, with the root it leads to."""
    try:
        proof = await run_in_threadpool(runtime.integrity.inclusion_proof, judgment_id, tree_size, caller.tenant)
        root = await run_in_threadpool(runtime.integrity.root_at, proof.tree_size)
    except JudgmentNotFoundError:
        raise _no_leaf(judgment_id) from None
    except ProofRangeError as exc:
        raise ApiError(422, str(exc), param="tree_size", code="invalid_value") from None
    return {"judgment_id": judgment_id, "leaf_index": proof.leaf_index, "tree_size": proof.tree_size,
            "record_hash": proof.record_hash, "leaf_hash": proof.leaf_hash, "audit_path": proof.audit_path,
            "root_hash": root}


@router.get("/v1/judgments/{judgment_id}/verification")
async def verification(judgment_id: str, runtime: RuntimeDep, caller: AuditReader,
                       tree_size: Annotated[int | None, Query(ge=1, description=(
                           "Size of a signed tree head to check against; default the latest."))] = None) -> dict:
    """Recompute the judgment's leaf from the stored record and check its inclusion in a signed tree head.

    ``status`` is verified, failed (``reason`` names the failure) or pending
    (``reason`` gives why a check could not run: a stream still in progress, or a head that
    does not cover the leaf yet). Each of ``checks`` is true, false or null
    where it did not run.
    """
    try:
        check = await run_in_threadpool(runtime.integrity.check_judgment, judgment_id, caller.tenant, tree_size)
    except JudgmentNotFoundError:
        raise ApiError(404, f"judgment {judgment_id[:80]!r} not found; list judgments with GET /v1/judgments",
                       type="not_found_error", param="judgment_id", code="judgment_not_found") from None
    except ProofRangeError as exc:
        raise ApiError(422, str(exc), param="tree_size", code="invalid_value") from None
    head = None if check.head is None else check.head.as_dict() | {"algorithm": "Ed25519"}
    return {"judgment_id": judgment_id, "status": check.status,
            "reason": "; ".join(check.problems) or check.pending, "erased": check.erased,
            "leaf_index": check.leaf_index, "tree_head": head,
            "checks": {"record": check.record, "inclusion": check.inclusion, "signature": check.signature}}


class EraseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000, description="Why the payload is erased (retention, privacy).")
    erased_by: str = Field(min_length=1, max_length=255, description="Who asked for the erasure.")


@router.post("/v1/admin/judgments/{judgment_id}/erase")
async def erase(judgment_id: str, body: EraseRequest, runtime: RuntimeDep, caller: AuditAdmin) -> dict:
    """Erase a judgment's prompt, output and trace; the record and its proof stay verifiable."""
    try:
        erasure = await run_in_threadpool(runtime.integrity.erase, judgment_id, body.erased_by, body.reason,
                                          caller.tenant)
    except JudgmentNotFoundError:
        raise _no_leaf(judgment_id) from None
    except ValueError as exc:
        raise ApiError(409, str(exc), type="invalid_request_error", param="judgment_id",
                       code="already_erased") from None
    return {"judgment_id": judgment_id, "erased_at": utc_iso(erasure.erased_at), "erased_by": erasure.erased_by,
            "reason": erasure.reason}


def _no_leaf(judgment_id: str) -> ApiError:
    return ApiError(404, f"judgment {judgment_id[:80]!r} has no leaf in the integrity log: it does not exist or its "
                    "stream has not finished", type="not_found_error", param="judgment_id", code="judgment_not_found")

