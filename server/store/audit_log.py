"""Auditor operations on the integrity log: tree heads, proofs, verification, erasure, retention."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from server.store import integrity, merkle
from server.store.integrity import Mismatch, SignedTreeHead, TreeHeadSigner, VerifyReport
from server.store.records import STARTED_STATUS, JudgmentRecord, StoreUnavailableError
from server.store.repository import _to_record, store_transaction
from server.store.tables import Erasure, IntegrityLeaf, Judgment, Trace

logger = logging.getLogger(__name__)

# Leaves read per query while verifying, so that memory stays bounded.
VERIFY_BATCH = 500
# Mismatching finished judgments without a leaf that a report names one by one.
MAX_NAMED_MISSING = 100


class JudgmentNotFoundError(LookupError):
    """No judgment has the id, or it has no leaf yet (a stream in progress)."""


class ProofRangeError(ValueError):
    """Tree sizes or a leaf index outside the current log."""


@dataclass
class InclusionProof:
    judgment_id: str
    leaf_index: int
    tree_size: int
    record_hash: str
    leaf_hash: str
    audit_path: list[str]  # hex, RFC 6962 order


@dataclass
class JudgmentCheck:
    """One judgment checked against a signed tree head.

    Each check is True or False, or None where it could not run. ``pending``
    gives the reason a check could not run, and ``problems`` lists what failed.
    """

    judgment_id: str
    erased: bool
    leaf_index: int | None = None
    head: SignedTreeHead | None = None
    record: bool | None = None  # the leaf recomputed from the stored judgment matches the logged leaf
    inclusion: bool | None = None  # the audit path leads from the leaf to the head's root
    signature: bool | None = None  # the head's signature verifies with the server's public key
    problems: list[str] = field(default_factory=list)
    pending: str | None = None

    @property
    def status(self) -> str:
        """"failed" when any check failed, else "pending" when one could not run, else "verified"."""
        if self.problems:
            return "failed"
        return "pending" if self.pending else "verified"


@dataclass
class ErasureRecord:
    judgment_id: str
    erased_at: datetime
    erased_by: str
    reason: str


class IntegrityLog:
    """The integrity log of one audit store, with the server's signing key."""

    def __init__(self, engine: Engine, signer: TreeHeadSigner | None):
        self._engine, self.signer = engine, signer

    # Tree heads and proofs

    def tree_head(self) -> SignedTreeHead:
        """Return the latest signed tree head, signing and storing a new one when the log has grown."""
        if self.signer is None:
            raise RuntimeError("no signing key is loaded, so no tree head can be signed")
        try:
            with store_transaction(self._engine, "sign a tree head") as session:
                size, latest = integrity.tree_size(session), integrity.latest_head(session)
                if latest is not None and latest.tree_size == size:
                    return latest
                head = self.signer.sign(size, integrity.root_at(session, size))
                integrity.store_head(session, head)
        except StoreUnavailableError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            # Another server signed this size first: both signed the same root, so theirs serves.
            with store_transaction(self._engine, "read a tree head") as session:
                return integrity.head_at(session, head.tree_size)
        logger.info("Signed tree head at size %d (root %s)", head.tree_size, head.root_hash)
        return head

    def inclusion_proof(self, judgment_id: str, tree_size: int | None = None,
                        tenant: str | None = None) -> InclusionProof:
        """Return the judgment's audit path in the tree of ``tree_size`` leaves (default: the current size).

        With ``tenant``, a judgment of another tenant raises JudgmentNotFoundError like an unknown id.
        """
        with store_transaction(self._engine, f"prove judgment {judgment_id}") as session:
            leaf = session.scalar(select(IntegrityLeaf).where(IntegrityLeaf.judgment_id == judgment_id))
            if leaf is None or not _in_tenant(session, judgment_id, tenant):
                raise JudgmentNotFoundError(judgment_id)
            size = integrity.tree_size(session)
            tree_size = size if tree_size is None else tree_size
            if not leaf.leaf_index < tree_size <= size:
                raise ProofRangeError(f"tree_size {tree_size} must be above the judgment's leaf index "
                                      f"{leaf.leaf_index} and at most the log's size {size}")
            path = integrity.inclusion_proof(session, leaf.leaf_index, tree_size)
            return InclusionProof(judgment_id, leaf.leaf_index, tree_size, leaf.record_hash, leaf.leaf_hash,
                                  [digest.hex() for digest in path])

    def consistency_proof(self, first: int, second: int) -> list[str]:
        with store_transaction(self._engine, "prove consistency") as session:
            size = integrity.tree_size(session)
            if not 0 < first <= second <= size:
                raise ProofRangeError(f"sizes must satisfy 0 < first <= second <= {size} (the log's size); "
                                      f"got first={first}, second={second}")
            return [digest.hex() for digest in integrity.consistency_proof(session, first, second)]

    def root_at(self, size: int) -> str:
        with store_transaction(self._engine, "compute a root") as session:
            current = integrity.tree_size(session)
            if not 0 <= size <= current:
                raise ProofRangeError(f"size must be between 0 and the log's size {current}; got {size}")
            return integrity.root_at(session, size).hex()

    def check_judgment(self, judgment_id: str, tenant: str | None = None,
                       tree_size: int | None = None) -> JudgmentCheck:
        """Recompute one judgment's leaf from its stored record and check it against a signed tree head.

        The head is the one signed at ``tree_size``, by default the latest (signed
        now when the log has grown). Raises JudgmentNotFoundError for an unknown
        id or another tenant's judgment, and ProofRangeError when no head was
        signed at ``tree_size``.
        """
        latest = self.tree_head() if tree_size is None and self.signer is not None else None
        with store_transaction(self._engine, f"check judgment {judgment_id}") as session:
            stored = session.execute(select(Judgment.tenant, Judgment.status)
                                     .where(Judgment.id == judgment_id)).one_or_none()
            if stored is None or (tenant is not None and stored.tenant != tenant):
                raise JudgmentNotFoundError(judgment_id)
            head = latest or self._head_for_check(session, tree_size)
            leaf = session.scalar(select(IntegrityLeaf).where(IntegrityLeaf.judgment_id == judgment_id))
            check = JudgmentCheck(judgment_id, session.get(Erasure, judgment_id) is not None, head=head)
            if leaf is None:
                _no_leaf_yet(check, stored.status)
                return check
            check.leaf_index = leaf.leaf_index
            self._check_record(session, check, leaf)
            self._check_inclusion(session, check, leaf)
        self._check_signature(check)
        return check

    @staticmethod
    def _head_for_check(session: Session, tree_size: int | None) -> SignedTreeHead | None:
        if tree_size is None:
            return integrity.latest_head(session)
        head = integrity.head_at(session, tree_size)
        if head is None:
            latest = integrity.latest_head(session)
            raise ProofRangeError(f"no tree head was signed at size {tree_size}; the latest signed head has size "
                                  f"{latest.tree_size if latest else 0} (GET /v1/audit/tree-head), or leave "
                                  "tree_size out to use it")
        return head

    def _check_record(self, session: Session, check: JudgmentCheck, leaf: IntegrityLeaf) -> None:
        record = self._load_records(session, [check.judgment_id])[check.judgment_id]
        problem = record if isinstance(record, str) else integrity.check_leaf(record, leaf, check.erased)
        check.record = problem is None
        if problem is not None:
            check.problems.append(f"the judgment (leaf {leaf.leaf_index}): {problem}")

    @staticmethod
    def _check_inclusion(session: Session, check: JudgmentCheck, leaf: IntegrityLeaf) -> None:
        head = check.head
        if head is None or head.tree_size <= leaf.leaf_index:
            signed = "no tree head is signed yet" if head is None else f"the tree head covers {head.tree_size} leaves"
            check.pending = f"{signed}, and the judgment is leaf {leaf.leaf_index}; a newer head will cover it"
            return
        path = integrity.inclusion_proof(session, leaf.leaf_index, head.tree_size)
        check.inclusion = merkle.verify_inclusion(bytes.fromhex(leaf.leaf_hash), leaf.leaf_index, head.tree_size,
                                                  path, bytes.fromhex(head.root_hash))
        if not check.inclusion:
            check.problems.append(f"the audit path of leaf {leaf.leaf_index} does not lead to the root signed at "
                                  f"size {head.tree_size}")

    def _check_signature(self, check: JudgmentCheck) -> None:
        if check.head is None or check.inclusion is None:
            return
        if self.signer is None:
            check.pending = check.pending or "no signing key is loaded, so the head's signature cannot be checked"
            return
        check.signature = integrity.verify_head_signature(check.head, self.signer.public_key_bytes)
        if not check.signature:
            check.problems.append(f"the tree head at size {check.head.tree_size} has an invalid signature for the "
                                  "server's key")

    # Appending what older revisions left without a leaf

    def append_missing_leaves(self) -> int:
        """Append leaves, in id order, for finished judgments that have none (those stored before the log)."""
        appended = 0
        while True:
            with store_transaction(self._engine, "append missing leaves") as session:
                rows = session.scalars(self._missing_leaf_query().limit(VERIFY_BATCH)
                                       .options(selectinload(Judgment.verdicts), selectinload(Judgment.trace))).all()
                leaves = [integrity.new_leaf(_to_record(row, with_trace=True)) for row in rows]
                if leaves:
                    integrity.append_leaves(session.connection(), leaves)
            appended += len(rows)
            if len(rows) < VERIFY_BATCH:
                break
        if appended:
            logger.info("Appended %d judgments stored before the integrity log to it", appended)
        return appended

    @staticmethod
    def _missing_leaf_query():
        has_leaf = select(IntegrityLeaf.judgment_id).where(IntegrityLeaf.judgment_id == Judgment.id).exists()
        return select(Judgment).where(Judgment.status != STARTED_STATUS, ~has_leaf).order_by(Judgment.id)

    # Verification

    def verify(self, public_key: bytes | None = None) -> VerifyReport:
        """Recompute every leaf from the stored records and check the tree against the latest signed head.

        Args:
            public_key: raw Ed25519 key to check the heads' signatures with; default the signer's.
        """
        report = VerifyReport()
        leaf_hashes = list(self._checked_leaves(report))
        report.leaves = len(leaf_hashes)
        report.root = merkle.root_from_leaves(leaf_hashes).hex()
        with store_transaction(self._engine, "verify the integrity log") as session:
            self._check_log_shape(session, report)
            report.head = integrity.latest_head(session)
        self._check_head(report, leaf_hashes, public_key or (self.signer.public_key_bytes if self.signer else None))
        return report

    def _checked_leaves(self, report: VerifyReport) -> Iterator[bytes]:
        """Yield each stored leaf hash in order, recording every judgment that does not match its leaf."""
        expected = 0
        while True:
            with store_transaction(self._engine, "read leaves") as session:
                leaves = session.scalars(select(IntegrityLeaf).where(IntegrityLeaf.leaf_index >= expected)
                                         .order_by(IntegrityLeaf.leaf_index).limit(VERIFY_BATCH)).all()
                ids = [leaf.judgment_id for leaf in leaves]
                records = self._load_records(session, ids)
                erased = set(session.scalars(select(Erasure.judgment_id).where(Erasure.judgment_id.in_(ids))))
                for leaf in leaves:
                    if leaf.leaf_index != expected:
                        report.mismatches.append(Mismatch(None, expected, f"leaves {expected} to "
                                                          f"{leaf.leaf_index - 1} are missing"))
                    expected = leaf.leaf_index + 1
                    self._check_one(leaf, records.get(leaf.judgment_id), leaf.judgment_id in erased, report)
                    yield bytes.fromhex(leaf.leaf_hash)
            if len(leaves) < VERIFY_BATCH:
                return

    @staticmethod
    def _load_records(session: Session, ids: list[str]) -> dict[str, JudgmentRecord | str]:
        """Load the judgments with their verdicts and traces; an unreadable one maps to what is wrong.

        A JSON column edited into invalid JSON (SQLite stores JSON as text) fails
        the whole batch, so the batch is then read again one judgment at a time.
        """
        def query(selected: list[str]):
            return (select(Judgment).where(Judgment.id.in_(selected))
                    .options(selectinload(Judgment.verdicts), selectinload(Judgment.trace)))

        try:
            return {row.id: _to_record(row, with_trace=True) for row in session.scalars(query(ids))}
        except ValueError:
            session.expunge_all()
        records: dict[str, JudgmentRecord | str] = {}
        for judgment_id in ids:
            try:
                row = session.scalars(query([judgment_id])).one_or_none()
                if row is not None:
                    records[judgment_id] = _to_record(row, with_trace=True)
            except ValueError as exc:
                records[judgment_id] = f"its stored data is no longer readable ({type(exc).__name__}: {exc})"
                session.expunge_all()
        return records

    @staticmethod
    def _check_one(leaf: IntegrityLeaf, record: JudgmentRecord | str | None, erased: bool,
                   report: VerifyReport) -> None:
        if record is None:
            report.mismatches.append(Mismatch(leaf.judgment_id, leaf.leaf_index, "the judgment is missing"))
            return
        report.erased += erased
        problem = record if isinstance(record, str) else integrity.check_leaf(record, leaf, erased)
        if problem is not None:
            report.mismatches.append(Mismatch(leaf.judgment_id, leaf.leaf_index, problem))

    def _check_log_shape(self, session: Session, report: VerifyReport) -> None:
        size = integrity.tree_size(session)
        if size != report.leaves:
            report.mismatches.append(Mismatch(None, None, f"the log's size is {size} but {report.leaves} "
                                              "leaves are stored"))
        elif size and integrity.root_at(session, size).hex() != report.root:
            report.mismatches.append(Mismatch(None, None, "the stored Merkle nodes do not match the leaves, "
                                              "so proofs served from them would fail"))
        missing = session.scalars(self._missing_leaf_query().with_only_columns(Judgment.id)
                                  .limit(MAX_NAMED_MISSING)).all()
        for judgment_id in missing:
            report.mismatches.append(Mismatch(judgment_id, None, "the judgment is finished but has no leaf"))
        report.unfinished = session.scalar(select(func.count()).select_from(Judgment)
                                           .where(Judgment.status == STARTED_STATUS))

    @staticmethod
    def _check_head(report: VerifyReport, leaf_hashes: list[bytes], public_key: bytes | None) -> None:
        head = report.head
        if head is None:
            return
        if public_key is not None and not integrity.verify_head_signature(head, public_key):
            report.mismatches.append(Mismatch(None, None, f"the tree head at size {head.tree_size} has an "
                                              "invalid signature for this key"))
        if head.tree_size > len(leaf_hashes):
            report.mismatches.append(Mismatch(None, None, f"the signed head covers {head.tree_size} leaves but "
                                              f"only {len(leaf_hashes)} are stored"))
        elif merkle.root_from_leaves(leaf_hashes[:head.tree_size]).hex() != head.root_hash:
            report.mismatches.append(Mismatch(None, None, f"the leaves no longer hash to the root signed at size "
                                              f"{head.tree_size}"))

    # Erasure

    def erase(self, judgment_id: str, erased_by: str, reason: str, tenant: str | None = None) -> ErasureRecord:
        """Remove a finished judgment's prompt, output and trace, recording who, when and why.

        The leaf keeps the payload's hash, so the judgment still verifies. With
        ``tenant``, a judgment of another tenant raises JudgmentNotFoundError like an unknown id.
        """
        erasure = ErasureRecord(judgment_id, datetime.now(timezone.utc), erased_by, reason)
        with store_transaction(self._engine, f"erase judgment {judgment_id}") as session:
            if not _in_tenant(session, judgment_id, tenant):
                raise JudgmentNotFoundError(judgment_id)
            self._erase_in(session, erasure)
        logger.info("Erased the payload of judgment %s (by %s: %s)", judgment_id, erased_by, reason)
        return erasure

    @staticmethod
    def _erase_in(session: Session, erasure: ErasureRecord) -> None:
        has_leaf = session.scalar(select(IntegrityLeaf.leaf_index).where(IntegrityLeaf.judgment_id
                                                                         == erasure.judgment_id))
        if has_leaf is None:
            raise JudgmentNotFoundError(erasure.judgment_id)
        if session.get(Erasure, erasure.judgment_id) is not None:
            raise ValueError(f"judgment {erasure.judgment_id} is already erased")
        session.execute(update(Judgment).where(Judgment.id == erasure.judgment_id).values(prompt={}, output=""))
        session.execute(delete(Trace).where(Trace.judgment_id == erasure.judgment_id))
        session.add(Erasure(judgment_id=erasure.judgment_id, erased_at=erasure.erased_at,
                            erased_by=erasure.erased_by, reason=erasure.reason))

    def erasure(self, judgment_id: str) -> ErasureRecord | None:
        with store_transaction(self._engine, f"read the erasure of {judgment_id}") as session:
            row = session.get(Erasure, judgment_id)
            return None if row is None else ErasureRecord(row.judgment_id, row.erased_at, row.erased_by, row.reason)

    def retain(self, days: int, now: datetime | None = None) -> int:
        """Erase the payloads of finished judgments created more than ``days`` days ago; return how many."""
        cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
        reason = f"retention: created more than {days} days ago"
        erased = 0
        while True:
            with store_transaction(self._engine, "apply retention") as session:
                already = select(Erasure.judgment_id).where(Erasure.judgment_id == IntegrityLeaf.judgment_id)
                ids = session.scalars(select(IntegrityLeaf.judgment_id).join(Judgment)
                                      .where(Judgment.created_at < cutoff, ~already.exists())
                                      .order_by(IntegrityLeaf.leaf_index).limit(VERIFY_BATCH)).all()
                for judgment_id in ids:
                    self._erase_in(session, ErasureRecord(judgment_id, datetime.now(timezone.utc), "retention",
                                                          reason))
            erased += len(ids)
            if len(ids) < VERIFY_BATCH:
                break
        logger.info("Retention erased the payloads of %d judgments created before %s", erased, cutoff.isoformat())
        return erased


def _no_leaf_yet(check: JudgmentCheck, status: str) -> None:
    if status == STARTED_STATUS:
        check.pending = ("the judgment is still started (a stream in progress, or one whose final commit failed), "
                         "so it has no leaf in the log yet")
    else:
        check.record = False
        check.problems.append(f"the judgment is {status} but has no leaf in the integrity log")


def _in_tenant(session: Session, judgment_id: str, tenant: str | None) -> bool:
    """Return whether the judgment belongs to ``tenant``; always true when ``tenant`` is None."""
    if tenant is None:
        return True
    stored = session.scalar(select(Judgment.tenant).where(Judgment.id == judgment_id))
    return stored == tenant
