"""GET /v1/judgments and /v1/judgments/{id}: read the audit store."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from server.dependencies import RuntimeDep
from server.errors import ApiError
from server.records import list_item_body, record_body
from server.schemas import JudgmentList, JudgmentRecordResponse
from server.store import JudgmentQuery

router = APIRouter(tags=["judgments"])


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ApiError(422, f"{name}={value.isoformat()} has no timezone; add one, e.g. {value.isoformat()}Z",
                       param=name, code="invalid_value")
    return value


@router.get("/v1/judgments", response_model=JudgmentList)
async def list_judgments(
    runtime: RuntimeDep,
    since: Annotated[datetime | None, Query(description="Created at or after this time (ISO 8601 with zone).")] = None,
    until: Annotated[datetime | None, Query(description="Created before this time (ISO 8601 with zone).")] = None,
    constraint: Annotated[str | None, Query(description="Constraint that min_score, max_score and passed apply to.")] = None,
    min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    max_score: Annotated[float | None, Query(ge=0, le=1)] = None,
    passed: Annotated[bool | None, Query(description="Only judgments where `constraint` passed (true) or failed (false).")] = None,
    flagged: Annotated[bool | None, Query()] = None,
    kind: Annotated[Literal["generation", "score"] | None, Query(description="Generations or scored responses only.")] = None,
    status: Annotated[Literal["started", "completed", "cancelled", "failed"] | None, Query(
        description="started: streams in progress or whose final commit failed; cancelled: the client disconnected.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page.")] = None,
) -> dict:
    known = runtime.model.constraints
    if constraint is not None and constraint not in known:
        raise ApiError(422, f"unknown constraint {constraint!r}; known: {', '.join(known)}", param="constraint",
                       code="invalid_value")
    for name, value in (("min_score", min_score), ("max_score", max_score), ("passed", passed)):
        if value is not None and constraint is None:
            shown = str(value).lower() if isinstance(value, bool) else value
            raise ApiError(422, f"{name}={shown} applies to one constraint's verdict; add constraint=<name> "
                           f"(one of {', '.join(known)})", param=name, code="invalid_value")
    if min_score is not None and max_score is not None and min_score > max_score:
        raise ApiError(422, f"min_score {min_score} is greater than max_score {max_score}; swap them",
                       param="min_score", code="invalid_value")
    since, until = _aware("since", since), _aware("until", until)
    if since is not None and until is not None and since >= until:
        raise ApiError(422, f"since {since.isoformat()} is not before until {until.isoformat()}; swap them",
                       param="since", code="invalid_value")
    query = JudgmentQuery(since, until, constraint, min_score, max_score, passed, flagged, kind, status)
    page = await run_in_threadpool(runtime.store.list, query, limit, cursor)
    return {"object": "list", "data": [list_item_body(record, known) for record in page.items],
            "next_cursor": page.next_cursor}


@router.get("/v1/judgments/{judgment_id}", response_model=JudgmentRecordResponse, response_model_exclude_unset=True)
async def get_judgment(judgment_id: str, runtime: RuntimeDep) -> dict:
    record = await run_in_threadpool(runtime.store.get, judgment_id)
    if record is None:
        raise ApiError(404, f"judgment {judgment_id[:80]!r} not found; list judgments with GET /v1/judgments",
                       type="not_found_error", param="judgment_id", code="judgment_not_found")
    return record_body(record)
