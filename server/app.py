"""The FastAPI application: routes, error mapping, request ids, and the runtime's life cycle."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from models.decode import ConstraintModel
from server.errors import install_error_handlers
from server.generation import shut_down
from server.limits import BodySizeLimitMiddleware
from server.observability import RequestContextMiddleware, RootPathMiddleware
from server.routes import audit, generate, health, judgments, openai, ui
from server.runtime import build_runtime
from server.settings import Settings
from server.store import StoreUnavailableError

logger = logging.getLogger(__name__)


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
        await shut_down(app.state.runtime)

    app = FastAPI(title="tracehead", version="0.1.0", lifespan=lifespan,
                  description="Generation with per-token constraint traces and an audit store.")
    install_error_handlers(app)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.include_router(generate.router)
    app.include_router(audit.router)
    app.include_router(judgments.router)
    app.include_router(openai.router)
    app.include_router(ui.router)

    app.include_router(health.router)
    add_observability_middleware(app, settings)
    return app


def add_observability_middleware(app: FastAPI, settings: Settings) -> None:
    """Add the request id middleware, the forwarded-header middleware of trusted proxies, and the root path.

    The last one added runs first: the prefix check reads the proxy's own address,
    which ProxyHeadersMiddleware then replaces with the forwarded client's.
    """
    app.add_middleware(RequestContextMiddleware)
    if settings.trusted_proxies:
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    app.add_middleware(RootPathMiddleware, root_path=settings.root_path, trusted_networks=settings.trusted_networks)


async def _sign_tree_heads(runtime) -> None:
    """Sign a tree head whenever the log has grown, every tree_head_interval_s seconds."""
    while True:
        try:
            await run_in_threadpool(runtime.integrity.tree_head)
        except StoreUnavailableError:
            logger.error("Could not sign a tree head; retrying in %.0f s", runtime.settings.tree_head_interval_s)
        await asyncio.sleep(runtime.settings.tree_head_interval_s)
