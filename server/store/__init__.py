"""The audit store: judgments, their verdicts and traces in a SQL database."""

from server.store.db import create_engine_for, database_revision, head_revision, is_newer_revision, upgrade_database
from server.store.records import (
    FINAL_STATUSES,
    JUDGMENT_STATUSES,
    STARTED_STATUS,
    JudgmentRecord,
    JudgmentStateError,
    StoreUnavailableError,
    VerdictRecord,
)
from server.store.repository import (
    AuditStore,
    InvalidCursorError,
    JudgmentPage,
    JudgmentQuery,
    new_judgment_id,
)

__all__ = [
    "FINAL_STATUSES",
    "JUDGMENT_STATUSES",
    "STARTED_STATUS",
    "AuditStore",
    "InvalidCursorError",
    "JudgmentPage",
    "JudgmentQuery",
    "JudgmentRecord",
    "JudgmentStateError",
    "StoreUnavailableError",
    "VerdictRecord",
    "create_engine_for",
    "database_revision",
    "head_revision",
    "new_judgment_id",
    "is_newer_revision",
    "upgrade_database",
]
