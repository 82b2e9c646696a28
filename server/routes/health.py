"""GET /healthz, /readyz and /metrics: for probes and scrapers, so none of them needs an API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from server.store import database_revision, head_revision, is_newer_revision

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

@router.get("/healthz")
async def healthz() -> dict:
    """Return ok while the process serves HTTP; a liveness probe."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a check failed; its entry in checks says why"}})
async def readyz(request: Request) -> JSONResponse:
    """Check that the model is loaded, the database runs ``SELECT 1`` and its schema is at the newest migration.

    Returns 200 ``{"status": "ok", "checks": {...}}`` with every check "ok", or 503
    ``{"status": "unavailable", "checks": {...}}`` where a failing check has its reason.
    """
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        checks = {"model": "not loaded: the server is starting", "database": "not checked",
                  "migrations": "not checked"}
    else:
        checks = await run_in_threadpool(_check_runtime, runtime)
    ready = all(result == "ok" or result.startswith("ok:") for result in checks.values())
    if not ready:
        logger.warning("Not ready: %s", checks)
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


def _check_runtime(runtime) -> dict[str, str]:
    checks = {"model": "ok" if runtime.model is not None else "not loaded"}
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}: {str(exc.orig if hasattr(exc, 'orig') else exc)}"
        checks["migrations"] = "not checked: the database is unreachable"
        return checks

    checks["database"] = "ok"
    revision, head = database_revision(runtime.engine), head_revision()
    if revision == head:
        checks["migrations"] = "ok"
    elif is_newer_revision(revision):
        # A newer release migrated the database; during a rolling upgrade this replica keeps serving.
        checks["migrations"] = f"ok: the database is at revision {revision}, newer than this server's {head}"
    else:
        checks["migrations"] = (f"behind: the database is at revision {revision}, the server needs {head}; "
                                "run `tracehead db upgrade`")
    return checks


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Return the app's metrics in the Prometheus text format."""
    return Response(generate_latest(request.app.state.runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
