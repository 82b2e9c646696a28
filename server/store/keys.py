"""API keys: create, look up by secret, list and revoke. Only the SHA-256 of each secret is stored."""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Engine, func, select, update

from server.store.repository import store_transaction
from server.store.tables import ApiKey

logger = logging.getLogger(__name__)

GENERATE_SCOPE = "generate"
AUDIT_READ_SCOPE = "audit:read"
AUDIT_ADMIN_SCOPE = "audit:admin"
SCOPES = (GENERATE_SCOPE, AUDIT_READ_SCOPE, AUDIT_ADMIN_SCOPE)

# Every secret starts with this, so that a leaked key is recognisable in logs and secret scanners.
SECRET_PREFIX = "th_"
# Characters of the secret stored in clear for display: the prefix and 8 random characters.
DISPLAY_PREFIX_LENGTH = len(SECRET_PREFIX) + 8


@dataclass
class ApiKeyRecord:
    """An API key as stored: everything but the secret."""

    id: str
    name: str
    tenant: str
    scopes: list[str]
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyNotFoundError(LookupError):
    """No API key has the id."""


def hash_secret(secret: str) -> str:
    """Return the hex SHA-256 of a key's secret.

    A fast unsalted hash is enough here, unlike for passwords: the secrets are
    32 random bytes from the secrets module, so no dictionary or brute-force
    search over them is feasible, and a fast hash keeps the lookup per request cheap.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    """The api_keys table of one audit store."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, name: str, tenant: str, scopes: list[str]) -> tuple[ApiKeyRecord, str]:
        """Store a new key and return it with its secret, which is not stored and cannot be shown again."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"invalid scopes {unknown or scopes}; give one or more of {', '.join(SCOPES)}")
        for label, value in (("name", name), ("tenant", tenant)):
            if not value.strip() or len(value) > 255:
                raise ValueError(f"the key's {label} {value[:80]!r} must be 1 to 255 characters, not blank")

        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(id=uuid.uuid4().hex, name=name, tenant=tenant, scopes=sorted(set(scopes), key=SCOPES.index),
                     key_hash=hash_secret(secret), prefix=secret[:DISPLAY_PREFIX_LENGTH],
                     created_at=datetime.now(timezone.utc), revoked_at=None)
        with store_transaction(self._engine, "create an API key") as session:
            session.add(row)
            session.flush()
            record = _to_record(row)
        logger.info("Created API key %s (%s) for tenant %s with scopes %s", record.id, name, tenant,
                    ",".join(record.scopes))
        return record, secret

    def find(self, secret: str) -> ApiKeyRecord | None:
        """Return the key whose secret this is, revoked or not, or None."""
        with store_transaction(self._engine, "look up an API key") as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret)))
            return None if row is None else _to_record(row)

    def list(self) -> list[ApiKeyRecord]:
        """Return every key, revoked ones included, oldest first."""
        with store_transaction(self._engine, "list API keys") as session:
            return [_to_record(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.created_at))]

    def count_active(self) -> int:
        with store_transaction(self._engine, "count API keys") as session:
            return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Mark the key revoked, from now on; revoking a revoked key keeps its first revocation time."""
        with store_transaction(self._engine, f"revoke API key {key_id}") as session:
            session.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                            .values(revoked_at=datetime.now(timezone.utc)))
            row = session.get(ApiKey, key_id)
            if row is None:
                raise KeyNotFoundError(key_id)
            record = _to_record(row)
        logger.info("Revoked API key %s (%s)", record.id, record.name)
        return record


def _to_record(row: ApiKey) -> ApiKeyRecord:
    return ApiKeyRecord(row.id, row.name, row.tenant, list(row.scopes), row.prefix, row.created_at, row.revoked_at)
