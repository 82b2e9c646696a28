"""GET /v1/judgments with its export and daily stats, and /v1/judgments/{id}: read the audit store."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from server.auth import AuditReader
from server.dependencies import RuntimeDep
from server.errors import ApiError
from server.export import MEDIA_TYPES, export_lines
from server.records import daily_stat_body, list_item_body, record_body
from server.schemas import (
    LIST_ITEM_FIELDS,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_KEYS,
    DailyStatList,
    JudgmentList,
    JudgmentRecordResponse,
)
from server.store import JudgmentQuery, JudgmentRecord
from server.store.integrity import utc_iso

logger = logging.getLogger(__name__)
router = APIRouter(tags=["judgments"])

# Bounds the LIKE pattern that a text search sends to the database.
MAX_TEXT_SEARCH_LENGTH = 512


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ApiError(422, f"{name}={value.isoformat()} has no timezone; add one, e.g. {value.isoformat()}Z",
                       param=name, code="invalid_value")
    return value


def _metadata_pairs(values: list[str]) -> dict[str, str]:
    """Parse repeated ``key:value`` parameters. The value may contain further colons."""
    if len(values) > MAX_METADATA_KEYS:
        raise ApiError(422, f"{len(values)} metadata filters given; a judgment stores at most {MAX_METADATA_KEYS} "
                       "keys, so send at most that many", param="metadata", code="invalid_value")
    pairs: dict[str, str] = {}
    for value in values:
        key, separator, expected = value.partition(":")
        if not separator or not key:
            raise ApiError(422, f"metadata={value[:80]!r} is not key:value; send one pair per parameter, "
                           "e.g. metadata=team:docs", param="metadata", code="invalid_value")
        if len(key) > MAX_METADATA_KEY_LENGTH:
            raise ApiError(422, f"metadata key {key[:80]!r} is {len(key)} characters; stored keys have at most "
                           f"{MAX_METADATA_KEY_LENGTH}", param="metadata", code="invalid_value")
        if key in pairs:
            raise ApiError(422, f"metadata key {key[:80]!r} is given twice; a judgment stores one value per key, "
                           "so send each key once", param="metadata", code="invalid_value")
        pairs[key] = expected
    return pairs


def _counted(records: Iterator[JudgmentRecord], request_id: str) -> Iterator[JudgmentRecord]:
    """Yield ``records``, and log how many were sent when the export ends, fails or the client leaves."""
    count = 0
    try:
        for record in records:
            yield record
            count += 1
    finally:
        logger.info("Request %s exported %d judgments", request_id, count)


def judgment_filters(
    runtime: RuntimeDep,
    caller: AuditReader,
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
    model: Annotated[str | None, Query(max_length=255, description="Base model name, matched exactly.")] = None,
    heads: Annotated[str | None, Query(max_length=255, description="Head checkpoint name, matched exactly.")] = None,
    metadata: Annotated[list[str] | None, Query(description=(
        "key:value, repeatable; every pair must be stored with the judgment."))] = None,
    q: Annotated[str | None, Query(min_length=1, max_length=MAX_TEXT_SEARCH_LENGTH, description=(
        "Case-insensitive substring of the output or of the prompt as JSON text (key names included)."))] = None,
) -> JudgmentQuery:
    """Check the filter parameters shared by the listing, the export and the stats, and build the query.

    The query reads the caller's tenant only.
    """
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
    return JudgmentQuery(since=since, until=until, constraint=constraint, min_score=min_score, max_score=max_score,
                         passed=passed, flagged=flagged, kind=kind, status=status, model=model, heads=heads,
                         metadata=_metadata_pairs(metadata or []), text=q, tenant=caller.tenant)


FiltersDep = Annotated[JudgmentQuery, Depends(judgment_filters)]
OrderQuery = Annotated[Literal["newest", "oldest"], Query(description="By creation time (judgment id).")]


def _selected_fields(fields: str) -> set[str]:
    """Parse the comma-separated ``fields`` parameter into the selected field names, ``id`` always among them."""
    names = [name.strip() for name in fields.split(",")]
    valid = ", ".join(LIST_ITEM_FIELDS)
    if "" in names:
        raise ApiError(422, f"fields={fields[:200]!r} has an empty field name; separate names with single commas, "
                       f"e.g. fields=id,created_at (valid fields: {valid})", param="fields", code="invalid_value")
    for name in names:
        if name not in LIST_ITEM_FIELDS:
            raise ApiError(422, f"unknown field {name[:80]!r} in fields; valid fields: {valid}", param="fields",
                           code="invalid_value")
    return {"id", *names}


@router.get("/v1/judgments", response_model=JudgmentList)
async def list_judgments(
    runtime: RuntimeDep,
    filters: FiltersDep,
    order: OrderQuery = "newest",
    fields: Annotated[str | None, Query(description=(
        "Comma-separated list item fields to return, e.g. id,created_at,judgment; id is always returned."))] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page.")] = None,
) -> dict | JSONResponse:
    selected = None if fields is None else _selected_fields(fields)
    page = await run_in_threadpool(runtime.store.list, replace(filters, order=order), limit, cursor)
    items = [list_item_body(record, runtime.model.constraints) for record in page.items]
    body = {"object": "list", "data": items, "next_cursor": page.next_cursor}
    if selected is None:
        return body
    # The response model requires every field, so a selection of fields is sent without it.
    body["data"] = [{name: value for name, value in item.items() if name in selected} for item in items]
    return JSONResponse(body)


# The export and stats routes come before /v1/judgments/{judgment_id}, which would otherwise match their paths.

@router.get("/v1/judgments/export", response_class=StreamingResponse, responses={
    200: {"description": "One line per judgment.", "content": {"application/x-ndjson": {}, "text/csv": {}}}})
async def export_judgments(
    request: Request,
    runtime: RuntimeDep,
    filters: FiltersDep,
    order: OrderQuery = "newest",
    export_format: Annotated[Literal["jsonl", "csv"], Query(alias="format", description=(
        "jsonl: a list item per line; csv: a header, then id, times, names, usage, metadata as JSON, "
        "and <constraint>_score, <constraint>_passed per constraint."))] = "jsonl",
    include_trace: Annotated[bool, Query(description="jsonl only: add each judgment's stored trace.")] = False,
) -> StreamingResponse:
    if include_trace and export_format == "csv":
        raise ApiError(422, "include_trace=true applies to format=jsonl only, because a CSV row has no trace "
                       "column; use format=jsonl or leave include_trace out", param="include_trace",
                       code="invalid_value")
    records = runtime.store.export(replace(filters, order=order), with_trace=include_trace)

    # Reading the first batch before the 200 is sent turns an unreachable store into a 503.
    first = await run_in_threadpool(next, records, None)
    # NOTE: a store failure in a later batch ends the body early, without an error line. uvicorn
    # then closes the connection before the last chunk, which curl and httpx report as an incomplete body.
    request_id = request.state.request_id
    records = _counted(itertools.chain([] if first is None else [first], records), request_id)
    lines = export_lines(records, export_format, runtime.model.constraints, include_trace)
    filename = f"judgments-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.{export_format}"
    logger.info("Request %s exports judgments as %s to %s", request_id, export_format, filename)
    return StreamingResponse(lines, media_type=MEDIA_TYPES[export_format],
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/v1/judgments/stats", response_model=DailyStatList)
async def judgment_stats(runtime: RuntimeDep, filters: FiltersDep) -> dict:
    stats = await run_in_threadpool(runtime.store.daily_stats, filters)
    return {"object": "list", "data": [daily_stat_body(stat) for stat in stats]}


@router.get("/v1/judgments/{judgment_id}", response_model=JudgmentRecordResponse, response_model_exclude_unset=True)
async def get_judgment(judgment_id: str, runtime: RuntimeDep, caller: AuditReader) -> dict:
    # Another tenant's judgment gets the same 404 as an unknown id, so ids reveal nothing across tenants.
    record = await run_in_threadpool(runtime.store.get, judgment_id, caller.tenant)
    if record is None:
        raise ApiError(404, f"judgment {judgment_id[:80]!r} not found; list judgments with GET /v1/judgments",
                       type="not_found_error", param="judgment_id", code="judgment_not_found")
    erasure = await run_in_threadpool(runtime.integrity.erasure, judgment_id)
    body = record_body(record)
    if erasure is not None:
        body["erasure"] = {"erased_at": utc_iso(erasure.erased_at), "erased_by": erasure.erased_by,
                           "reason": erasure.reason}
    return body
