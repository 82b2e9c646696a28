"""SQLAlchemy mappings of the audit store tables.

The schema itself is created by the Alembic revisions in ``migrations/``. A
change here needs a new revision, and a test compares the two.
"""

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Fixed names for constraints and indexes, so that migrations can refer to them
# on every backend. SQLite would otherwise leave them unnamed.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored as naive UTC.

    SQLite drops the offset, so every backend gets the same naive UTC value and
    reads return it with ``timezone.utc`` attached. Binding a naive datetime
    raises ValueError, because its offset is unknown.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"Naive datetime {value.isoformat()} has no UTC offset. Pass a timezone-aware datetime.")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Judgment(Base):
    """One generation request with its output and the model and heads that judged it."""

    __tablename__ = "judgments"
    __table_args__ = (
        Index(None, "created_at"),
        Index(None, "flagged", "created_at"),
        Index(None, "kind", "created_at"),
        Index(None, "status", "created_at"),
        Index(None, "model_name", "created_at"),
        Index(None, "heads_name", "created_at"),
        Index(None, "tenant", "created_at"),
    )

    # UUIDv7 in canonical text form, so that ids sort by creation time.
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # completed_at, finish_reason and latency_ms are NULL while status is "started".
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    request_id: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(255))
    model_fingerprint: Mapped[str] = mapped_column(String(128))
    heads_name: Mapped[str] = mapped_column(String(255))
    heads_fingerprint: Mapped[str] = mapped_column(String(128))
    # {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}
    prompt: Mapped[dict[str, Any]] = mapped_column(JSON)
    output: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # "started", then "completed", "cancelled" or "failed".
    status: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    # The column is "metadata", but declarative classes reserve that attribute name.
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    # "generation", or "score" for a text that the caller supplied.
    kind: Mapped[str] = mapped_column(String(16), server_default="generation")
    # The constraint policy applied to the request and its outcome. none_as_null
    # stores None as SQL NULL rather than the JSON text "null".
    policy: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # The tenant of the API key (or gateway consumer) that made the request; audit reads see their own tenant only.
    tenant: Mapped[str] = mapped_column(String(255), server_default="default")

    verdicts: Mapped[list["Verdict"]] = relationship(
        back_populates="judgment",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Verdict.constraint",
    )
    # lazy="raise" makes an accidental trace load in a list query fail loudly.
    # Readers that want the trace request it with a loader option.
    trace: Mapped["Trace | None"] = relationship(
        back_populates="judgment",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="raise",
    )


class Verdict(Base):
    """The outcome of one constraint for one judgment."""

    __tablename__ = "verdicts"
    __table_args__ = (
        Index(None, "constraint", "score"),
        # With judgment_id, the passed filter reads the judgment ids from the index, not from the table.
        Index(None, "constraint", "passed", "judgment_id"),
    )

    judgment_id: Mapped[str] = mapped_column(
        ForeignKey("judgments.id", ondelete="CASCADE"), primary_key=True
    )
    constraint: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Scores are sigmoid outputs in [0, 1]. score is the value at the last token.
    score: Mapped[float] = mapped_column(Float)
    min_score: Mapped[float] = mapped_column(Float)
    # Index of the token with the minimum score in the prompt + output sequence.
    min_position: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean)

    judgment: Mapped[Judgment] = relationship(back_populates="verdicts")


class Trace(Base):
    """The per-token constraint trace of one judgment."""

    __tablename__ = "traces"

    judgment_id: Mapped[str] = mapped_column(
        ForeignKey("judgments.id", ondelete="CASCADE"), primary_key=True
    )
    # Version of the layout of ``data``, so that readers can handle older rows.
    format_version: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    judgment: Mapped[Judgment] = relationship(back_populates="trace")


# The integrity log: an RFC 6962 Merkle tree whose leaves are the judgments' record hashes.
# Hashes are stored as lowercase hex of SHA-256 digests (64 characters).


class IntegrityLeaf(Base):
    """One leaf of the integrity log: the hash of one finished judgment's record."""

    __tablename__ = "integrity_leaves"

    # Position in the log, from 0, without gaps.
    leaf_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # No cascade: a judgment with a leaf cannot be deleted, only its payload erased.
    judgment_id: Mapped[str] = mapped_column(ForeignKey("judgments.id"), unique=True)
    # Hash over the judgment's fields, verdicts and payload_hash; the leaf hashes this.
    record_hash: Mapped[str] = mapped_column(String(64))
    # Hash over the erasable payload (prompt, output, trace), kept when the payload is erased.
    payload_hash: Mapped[str] = mapped_column(String(64))
    leaf_hash: Mapped[str] = mapped_column(String(64))
    # Version of the canonical serialisation that record_hash and payload_hash cover.
    hash_version: Mapped[int] = mapped_column(Integer)
    appended_at: Mapped[datetime] = mapped_column(UTCDateTime())


class MerkleNode(Base):
    """The hash of a perfect subtree: 2**level leaves starting at leaf node_index * 2**level (level >= 1)."""

    __tablename__ = "merkle_nodes"

    level: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    node_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))


class IntegrityState(Base):
    """The log's size in one row; appending locks the row, so concurrent writers get consecutive leaves."""

    __tablename__ = "integrity_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    tree_size: Mapped[int] = mapped_column(BigInteger)


class TreeHead(Base):
    """A signed tree head: the log's root at one size, signed with the server's Ed25519 key."""

    __tablename__ = "tree_heads"

    tree_size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root_hash: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # SHA-256 of the raw public key, in hex: which key signed.
    key_id: Mapped[str] = mapped_column(String(64))
    # Hex of the 64-byte Ed25519 signature over the head's canonical JSON.
    signature: Mapped[str] = mapped_column(String(128))


class Erasure(Base):
    """The record of an erased payload: who erased it, when and why. The leaf stays verifiable through payload_hash."""

    __tablename__ = "erasures"

    judgment_id: Mapped[str] = mapped_column(ForeignKey("judgments.id"), primary_key=True)
    erased_at: Mapped[datetime] = mapped_column(UTCDateTime())
    erased_by: Mapped[str] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)


class ApiKey(Base):
    """An API key: its name, tenant and scopes, and the SHA-256 of its secret (the secret itself is never stored)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    tenant: Mapped[str] = mapped_column(String(255))
    # A JSON list of scope names, e.g. ["generate", "audit:read"].
    scopes: Mapped[list[str]] = mapped_column(JSON)
    # Lowercase hex of SHA-256 over the secret, which is how a request's key is looked up.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The secret's first characters, so that `tracehead keys list` can show which key is which.
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set once by `tracehead keys revoke`; a revoked key authenticates nothing.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
