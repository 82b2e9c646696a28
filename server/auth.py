"""Caller identity: API keys with scopes and tenants, a trusted gateway's identity, and per-key concurrency.

Routes declare the scope they need with one of the Annotated aliases at the
end (``GenerateCaller``, ``AuditReader``, ``AuditAdmin``), and read the
caller's tenant from the Principal they receive.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from server.errors import ApiError
from server.observability import direct_peer, is_trusted_proxy
from server.settings import Settings
from server.store.keys import AUDIT_ADMIN_SCOPE, AUDIT_READ_SCOPE, GENERATE_SCOPE, SCOPES, KeyStore

logger = logging.getLogger(__name__)

# The tenant of every request when auth is "none", and of judgments stored before tenants existed.
DEFAULT_TENANT = "default"
API_KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class Principal:
    """The caller of one request.

    ``id`` names the API key or gateway consumer, and is None with auth "none",
    where no per-key limit applies.
    """

    id: str | None
    name: str
    tenant: str
    scopes: frozenset[str]
    source: str  # "key", "gateway" or "none"


UNAUTHENTICATED = Principal(None, "development", DEFAULT_TENANT, frozenset(SCOPES), "none")


class KeySlots:
    """Requests in progress per caller id. The event loop's single thread is the only one that touches it."""

    def __init__(self) -> None:
        self._active: Counter[str] = Counter()

    def acquire(self, caller_id: str, limit: int) -> bool:
        if self._active[caller_id] >= limit:
            return False
        self._active[caller_id] += 1
        return True

    def release(self, caller_id: str) -> None:
        self._active[caller_id] -= 1
        if self._active[caller_id] <= 0:
            del self._active[caller_id]


def log_auth_mode(settings: Settings, keys: KeyStore) -> None:
    """Log at start how requests are authenticated, with a WARNING where the API is open or unusable."""
    if settings.auth == "none":
        logger.warning('TRACEHEAD_AUTH=none: every request acts as tenant "%s" with every scope (%s); set '
                       "TRACEHEAD_AUTH=keys before exposing this server", DEFAULT_TENANT, ", ".join(SCOPES))
        return
    active = keys.count_active()
    if active == 0 and not settings.trusted_proxies:
        logger.warning("TRACEHEAD_AUTH=keys but the store has no active API key, so every request gets 401 "
                       "until one is created with `tracehead keys create`")
    else:
        logger.info("API keys required: %d active keys, %d trusted proxies", active, len(settings.trusted_proxies))


async def authenticate(request: Request, settings: Settings, keys: KeyStore) -> Principal:
    """Return the caller of ``request``, or raise a 401 ApiError."""
    if settings.auth == "none":
        return UNAUTHENTICATED
    gateway = _gateway_principal(request, settings)
    if gateway is not None:
        return gateway

    secret = _presented_key(request)
    if secret is None:
        raise _unauthenticated("no API key was sent; send it as `Authorization: Bearer <key>` or "
                               f"`{API_KEY_HEADER}: <key>` (create one with `tracehead keys create`)", "missing_api_key")
    key = await run_in_threadpool(keys.find, secret)
    if key is None:
        raise _unauthenticated("the API key is not valid; check it, or create one with `tracehead keys create`",
                               "invalid_api_key")
    if key.revoked_at is not None:
        raise _unauthenticated(f"the API key {key.prefix}... was revoked at {key.revoked_at.isoformat()}; use "
                               "another key", "revoked_api_key")
    return Principal(key.id, key.name, key.tenant, frozenset(key.scopes), "key")


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get(API_KEY_HEADER, "").strip() or None


def _gateway_principal(request: Request, settings: Settings) -> Principal | None:
    """Return the identity that a trusted gateway put in the headers, or None to authenticate by key."""
    consumer = request.headers.get(settings.gateway_consumer_header)
    if consumer is None:
        return None
    # The connection's own peer, never X-Forwarded-For's client: the gateway connects, the caller does not.
    peer = direct_peer(request.scope)
    if not is_trusted_proxy(peer, settings.trusted_networks):
        logger.debug("Request %s: ignored %s from untrusted peer %s", request.state.request_id,
                     settings.gateway_consumer_header, peer)
        return None
    tenant = request.headers.get(settings.gateway_tenant_header, "").strip()
    if not consumer.strip() or not tenant:
        raise _unauthenticated(f"the gateway sent {settings.gateway_consumer_header}={consumer[:80]!r} and "
                               f"{settings.gateway_tenant_header}={tenant[:80]!r}; both must be non-empty",
                               "invalid_gateway_identity")
    granted = {scope.strip() for scope in request.headers.get(settings.gateway_scopes_header, "").split(",")}
    return Principal(f"gateway:{consumer.strip()}", consumer.strip(), tenant, frozenset(granted & set(SCOPES)),
                     "gateway")


def _unauthenticated(message: str, code: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code=code,
                    headers={"WWW-Authenticate": "Bearer"})


def require_scope(scope: str) -> Callable[..., AsyncIterator[Principal]]:
    """Build the dependency that authenticates a request, checks ``scope`` and takes a per-key slot.

    The slot is released after the response is sent, streamed ones included,
    because FastAPI runs the code after ``yield`` then.
    """
    async def dependency(request: Request) -> AsyncIterator[Principal]:
        runtime = request.app.state.runtime
        principal = await authenticate(request, runtime.settings, runtime.keys)
        if scope not in principal.scopes:
            raise ApiError(403, f"the {principal.source} {principal.name!r} lacks the scope {scope!r} that "
                           f"{request.url.path} needs; it has {', '.join(sorted(principal.scopes)) or 'none'}",
                           type="permission_error", code="missing_scope")
        request.state.principal = principal
        if principal.id is None:
            yield principal
            return

        limit = runtime.settings.max_concurrent_per_key
        if not runtime.key_slots.acquire(principal.id, limit):
            retry_after = runtime.settings.queue_retry_after_s
            raise ApiError(429, f"{principal.name!r} already has {limit} requests in progress, the limit per "
                           f"key (TRACEHEAD_MAX_CONCURRENT_PER_KEY); retry in {retry_after} s", type="rate_limit_error",
                           code="too_many_concurrent_requests", headers={"Retry-After": str(retry_after)})
        try:
            yield principal
        finally:
            runtime.key_slots.release(principal.id)

    return dependency


GenerateCaller = Annotated[Principal, Depends(require_scope(GENERATE_SCOPE))]
AuditReader = Annotated[Principal, Depends(require_scope(AUDIT_READ_SCOPE))]
AuditAdmin = Annotated[Principal, Depends(require_scope(AUDIT_ADMIN_SCOPE))]
