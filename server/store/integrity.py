"""The integrity log: record hashes as leaves of an RFC 6962 Merkle tree, with signed tree heads.

Each finished judgment gets one leaf, appended in the same transaction as the
judgment itself. The leaf covers a record hash over the judgment's fields,
verdicts and a payload hash. The payload (prompt, output, trace) is hashed on
its own, so erasing it changes neither the record hash nor the leaf, and every
proof still verifies.

Appends take a row lock on ``integrity_state`` (an UPDATE of its one row), so
writers in several processes on one PostgreSQL database get consecutive leaf
indexes without gaps or duplicates. On SQLite the UPDATE takes the database's
write lock, with the same effect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, bindparam, insert, select, tuple_, update
from sqlalchemy.orm import Session

from server.store import merkle
from server.store.tables import IntegrityLeaf, IntegrityState, MerkleNode, TreeHead

if TYPE_CHECKING:
    from server.store.records import JudgmentRecord

logger = logging.getLogger(__name__)

# Version of the canonical serialisation below; stored with each leaf.
HASH_VERSION = 1
STATE_ROW_ID = 1


# Hashing

def canonical_text(value: Any) -> str:
    """Serialise ``value`` the one way the hashes use: sorted keys, no spaces, no NaN, non-ASCII unescaped.

    Raises ValueError for NaN or infinity and TypeError for a value that JSON cannot represent.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> bytes:
    """Return ``canonical_text(value)`` encoded as UTF-8: the bytes that the hashes cover."""
    return canonical_text(value).encode()


def utc_iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


def payload_hash(record: JudgmentRecord, trace_json: str | None = None) -> str:
    """Hash the erasable payload of a judgment: its prompt, output and trace.

    The hash covers canonical_json({"output": ..., "prompt": ..., "trace": ...}).
    Pass ``trace_json``, the canonical_text of the trace, when the caller has it
    already: the trace is most of the payload, and serialising it is most of the
    cost of hashing.
    """
    if trace_json is None:
        trace_json = canonical_text(record.trace)
    # Canonical JSON of an object is its sorted members, each serialised canonically,
    # so the payload is built from its three members with the same bytes.
    digest = hashlib.sha256(b'{"output":')
    digest.update(canonical_json(record.output))
    digest.update(b',"prompt":')
    digest.update(canonical_json(record.prompt))
    digest.update(b',"trace":')
    digest.update(trace_json.encode())
    digest.update(b"}")
    return digest.hexdigest()


def record_hash(record: JudgmentRecord, payload_digest: str) -> str:
    """Hash everything stored about a judgment except the payload, which enters through its hash."""
    # NOTE: the tenant is not hashed, because hash version 1 predates it. A changed tenant moves a
    # judgment between tenants' audit reads without failing verify; covering it needs HASH_VERSION 2.
    fields = {
        "hash_version": HASH_VERSION, "id": record.id, "created_at": utc_iso(record.created_at),
        "completed_at": utc_iso(record.completed_at), "request_id": record.request_id,
        "model_name": record.model_name, "model_fingerprint": record.model_fingerprint,
        "heads_name": record.heads_name, "heads_fingerprint": record.heads_fingerprint,
        "parameters": record.parameters, "finish_reason": record.finish_reason, "status": record.status,
        "prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens,
        "latency_ms": record.latency_ms, "flagged": record.flagged, "metadata": record.metadata,
        "kind": record.kind, "policy": record.policy, "payload_hash": payload_digest,
        "verdicts": sorted(([v.constraint, v.score, v.min_score, v.min_position, v.threshold, v.passed]
                            for v in record.verdicts), key=lambda row: row[0]),
    }
    return hashlib.sha256(canonical_json(fields)).hexdigest()


# Appending

@dataclass(frozen=True)
class NewLeaf:
    """The hashes of one finished judgment, ready to be appended to the log."""

    judgment_id: str
    record_hash: str  # hex
    payload_hash: str  # hex


def new_leaf(record: JudgmentRecord, trace_json: str | None = None) -> NewLeaf:
    """Hash a finished judgment for its leaf. ``trace_json`` is as for payload_hash."""
    payload_digest = payload_hash(record, trace_json)
    return NewLeaf(record.id, record_hash(record, payload_digest), payload_digest)


_STATE, _LEAVES, _NODES = IntegrityState.__table__, IntegrityLeaf.__table__, MerkleNode.__table__
_RESERVE_LEAVES = (update(_STATE).where(_STATE.c.id == STATE_ROW_ID)
                   .values(tree_size=_STATE.c.tree_size + bindparam("count")).returning(_STATE.c.tree_size))
_READ_LEAF = select(_LEAVES.c.leaf_hash).where(_LEAVES.c.leaf_index == bindparam("leaf_index"))
_READ_NODES = select(_NODES.c.level, _NODES.c.node_index, _NODES.c.hash).where(
    tuple_(_NODES.c.level, _NODES.c.node_index).in_(bindparam("nodes", expanding=True)))


def append_leaves(connection: Connection, leaves: list[NewLeaf]) -> int:
    """Append ``leaves`` in order, with the Merkle nodes they complete, and return the index of the first.

    Runs inside the caller's transaction, after the judgment rows were
    written. The UPDATE of ``integrity_state`` reserves consecutive indexes and
    holds the row lock until the transaction ends.
    """
    tree_size = connection.execute(_RESERVE_LEAVES, {"count": len(leaves)}).scalar_one()
    first = tree_size - len(leaves)

    nodes = _read_merged_roots(connection, first, len(leaves))
    appended_at = datetime.now(timezone.utc)
    leaf_rows, node_rows = [], []
    for index, leaf in enumerate(leaves, start=first):
        digest = merkle.leaf_hash(bytes.fromhex(leaf.record_hash))
        nodes[(0, index)] = digest
        leaf_rows.append({"leaf_index": index, "judgment_id": leaf.judgment_id, "record_hash": leaf.record_hash,
                          "payload_hash": leaf.payload_hash, "leaf_hash": digest.hex(),
                          "hash_version": HASH_VERSION, "appended_at": appended_at})
        for level, node_index, node in merkle.nodes_completed_by(index, digest, partial(_known_node, nodes)):
            nodes[(level, node_index)] = node
            node_rows.append({"level": level, "node_index": node_index, "hash": node.hex()})

    connection.execute(insert(_LEAVES), leaf_rows)
    if node_rows:
        connection.execute(insert(_NODES), node_rows)
    return first


def _read_merged_roots(connection: Connection, size: int, count: int) -> dict[tuple[int, int], bytes]:
    """Read the roots of the tree of ``size`` leaves that appending ``count`` more merges into larger nodes.

    The tree of ``size`` leaves is one perfect subtree per 1 bit of ``size``,
    largest first. Appends read no other stored node: every other left sibling
    is a node they create themselves.
    """
    merged, start = [], 0
    for level in reversed(range(size.bit_length())):
        if size >> level & 1:
            # The root at this level merges once the tree reaches the next multiple of 2**(level + 1).
            if (size + count) >> (level + 1) > size >> (level + 1):
                merged.append((level, start >> level))
            start += 1 << level

    nodes = {}
    if merged and merged[-1][0] == 0:
        stored = connection.execute(_READ_LEAF, {"leaf_index": size - 1}).scalar_one_or_none()
        if stored is not None:
            nodes[(0, size - 1)] = bytes.fromhex(stored)
    upper = [(level, index) for level, index in merged if level > 0]
    if upper:
        for row in connection.execute(_READ_NODES, {"nodes": upper}):
            nodes[(row.level, row.node_index)] = bytes.fromhex(row.hash)
    return nodes


def _known_node(nodes: dict[tuple[int, int], bytes], level: int, index: int) -> bytes:
    try:
        return nodes[(level, index)]
    except KeyError:
        raise LookupError(f"the integrity log has no node at level {level}, index {index}") from None


class _NodeReader:
    """Reads perfect-subtree hashes from the store: level 0 from the leaves, higher levels from merkle_nodes."""

    def __init__(self, session: Session):
        self.session = session

    def node(self, level: int, index: int) -> bytes:
        if level == 0:
            digest = self.session.scalar(select(IntegrityLeaf.leaf_hash).where(IntegrityLeaf.leaf_index == index))
        else:
            digest = self.session.scalar(select(MerkleNode.hash).where(MerkleNode.level == level,
                                                                      MerkleNode.node_index == index))
        if digest is None:
            raise LookupError(f"the integrity log has no node at level {level}, index {index}")
        return bytes.fromhex(digest)


def tree_size(session: Session) -> int:
    return session.scalar(select(IntegrityState.tree_size).where(IntegrityState.id == STATE_ROW_ID))


def root_at(session: Session, size: int) -> bytes:
    return merkle.root_hash(size, _NodeReader(session).node)


def inclusion_proof(session: Session, index: int, size: int) -> list[bytes]:
    return merkle.inclusion_proof(index, size, _NodeReader(session).node)


def consistency_proof(session: Session, old_size: int, new_size: int) -> list[bytes]:
    return merkle.consistency_proof(old_size, new_size, _NodeReader(session).node)


# Signing

@dataclass
class SignedTreeHead:
    tree_size: int
    root_hash: str  # hex
    timestamp: datetime
    key_id: str  # hex SHA-256 of the raw public key
    signature: str  # hex Ed25519 signature over signed_bytes()

    def signed_bytes(self) -> bytes:
        return canonical_json({"tree_size": self.tree_size, "root_hash": self.root_hash,
                               "timestamp": utc_iso(self.timestamp)})

    def as_dict(self) -> dict:
        return {"tree_size": self.tree_size, "root_hash": self.root_hash, "timestamp": utc_iso(self.timestamp),
                "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: dict) -> "SignedTreeHead":
        return cls(int(data["tree_size"]), str(data["root_hash"]), datetime.fromisoformat(data["timestamp"]),
                   str(data["key_id"]), str(data["signature"]))


@dataclass
class TreeHeadSigner:
    """Signs tree heads with an Ed25519 private key; the public key is published for auditors."""

    private_key: Ed25519PrivateKey
    public_key: Ed25519PublicKey = field(init=False)

    def __post_init__(self) -> None:
        self.public_key = self.private_key.public_key()

    @property
    def public_key_bytes(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.public_key_bytes).hexdigest()

    def sign(self, size: int, root: bytes) -> SignedTreeHead:
        head = SignedTreeHead(size, root.hex(), datetime.now(timezone.utc), self.key_id, "")
        head.signature = self.private_key.sign(head.signed_bytes()).hex()
        return head


def verify_head_signature(head: SignedTreeHead, public_key_bytes: bytes) -> bool:
    """Check a tree head's signature with a raw Ed25519 public key, and that the key id names that key."""
    if hashlib.sha256(public_key_bytes).hexdigest() != head.key_id:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key_bytes).verify(bytes.fromhex(head.signature),
                                                                    head.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create_key(path: Path) -> TreeHeadSigner:
    """Load a PEM Ed25519 private key, or create one there (mode 0600) when the file does not exist.

    Creation is exclusive, so of two processes starting at once one writes the key and both load it.
    """
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; load theirs below
        else:
            with os.fdopen(descriptor, "wb") as file:
                file.write(pem)
            logger.warning("Created a new tree-head signing key at %s; keep it safe and back it up", path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} contains a {type(key).__name__}, not an Ed25519 private key; "
                         "generate one with `openssl genpkey -algorithm ed25519`")
    return TreeHeadSigner(key)


def latest_head(session: Session) -> SignedTreeHead | None:
    row = session.scalars(select(TreeHead).order_by(TreeHead.tree_size.desc()).limit(1)).first()
    return None if row is None else _head_from_row(row)


def head_at(session: Session, size: int) -> SignedTreeHead | None:
    row = session.get(TreeHead, size)
    return None if row is None else _head_from_row(row)


def store_head(session: Session, head: SignedTreeHead) -> None:
    session.add(TreeHead(tree_size=head.tree_size, root_hash=head.root_hash, signed_at=head.timestamp,
                         key_id=head.key_id, signature=head.signature))


def _head_from_row(row: TreeHead) -> SignedTreeHead:
    return SignedTreeHead(row.tree_size, row.root_hash, row.signed_at, row.key_id, row.signature)


# Verification

@dataclass
class Mismatch:
    judgment_id: str | None
    leaf_index: int | None
    problem: str


@dataclass
class VerifyReport:
    leaves: int = 0
    erased: int = 0
    unfinished: int = 0  # streamed judgments still "started": no leaf yet
    root: str | None = None
    head: SignedTreeHead | None = None
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_leaf(record: JudgmentRecord, leaf: IntegrityLeaf, erased: bool) -> str | None:
    """Return what is wrong with one judgment against its leaf, or None when it verifies."""
    if leaf.hash_version != HASH_VERSION:
        return f"leaf hash version {leaf.hash_version} is unknown to this server (it knows {HASH_VERSION})"
    if not erased and payload_hash(record) != leaf.payload_hash:
        return "its prompt, output or trace differs from what was logged"
    if record_hash(record, leaf.payload_hash) != leaf.record_hash:
        return "its stored fields or verdicts differ from what was logged"
    if merkle.leaf_hash(bytes.fromhex(leaf.record_hash)).hex() != leaf.leaf_hash:
        return "its leaf hash does not match its record hash"
    return None


def leaf_hashes(leaves: Iterator[IntegrityLeaf]) -> Iterator[bytes]:
    for leaf in leaves:
        yield bytes.fromhex(leaf.leaf_hash)
