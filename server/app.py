"""The FastAPI application: routes, error mapping, request ids, and the runtime's life cycle."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from models.decode import ConstraintModel
from server.errors import install_error_handlers
from server.routes import audit, generate, judgments, openai
from server.runtime import build_runtime
from server.settings import Settings
from server.store import StoreUnavailableError

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def create_app(settings: Settings | None = None, model: ConstraintModel | None = None) -> FastAPI:
    """Build the app; the runtime (store, model, worker) starts with the app's lifespan.

    Args:
        model: an already loaded model (tests pass a tiny one); None loads the configured model.
    """
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.runtime = build_runtime(settings, model)
        logger.info("tracehead ready: model %s, heads %s, store %s", app.state.runtime.model.base.name,
                    app.state.runtime.model.heads.config.name, app.state.runtime.engine.url.render_as_string())
        signing = asyncio.create_task(_sign_tree_heads(app.state.runtime))
        yield
        signing.cancel()
        app.state.runtime.close()

    app = FastAPI(title="tracehead", version="0.1.0", lifespan=lifespan,
                  description="Generation with per-token constraint traces and an audit store.")
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(audit.router)
    app.include_router(judgments.router)
    app.include_router(openai.router)

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        # A gateway's id is kept when it is well formed; otherwise the server makes one.
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request.state.request_id = incoming if _REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        return response

    return app


async def _sign_tree_heads(runtime) -> None:
    """Sign a tree head whenever the log has grown, every tree_head_interval_s seconds."""
    while True:
        try:
            await run_in_threadpool(runtime.integrity.tree_head)
        except StoreUnavailableError:
            logger.error("Could not sign a tree head; retrying in %.0f s", runtime.settings.tree_head_interval_s)
        await asyncio.sleep(runtime.settings.tree_head_interval_s)
