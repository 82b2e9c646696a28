"""Let a judgment be stored while it streams, and add judgments.policy.

A streamed judgment is inserted with status "started" before its first token,
so completed_at, finish_reason and latency_ms become nullable. The policy
column contains the constraint policy applied to the request and its outcome.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Columns that stay NULL until a streamed judgment finishes.
COMPLETION_COLUMNS = (
    ("completed_at", sa.DateTime()),
    ("finish_reason", sa.String(length=32)),
    ("latency_ms", sa.Float()),
)


def upgrade() -> None:
    with op.batch_alter_table("judgments") as batch:
        for name, column_type in COMPLETION_COLUMNS:
            batch.alter_column(name, existing_type=column_type, nullable=True)
        batch.add_column(sa.Column("policy", sa.JSON(), nullable=True))
        batch.create_index(op.f("ix_judgments_status_created_at"), ["status", "created_at"])


def downgrade() -> None:
    # Before 0003 these columns were NOT NULL, so a judgment that never finished
    # gets completed_at = created_at, finish_reason = '' and latency_ms = 0. Its
    # status stays "started", which tells it apart from a finished judgment.
    op.execute("UPDATE judgments SET completed_at = created_at WHERE completed_at IS NULL")
    op.execute("UPDATE judgments SET finish_reason = '' WHERE finish_reason IS NULL")
    op.execute("UPDATE judgments SET latency_ms = 0 WHERE latency_ms IS NULL")

    with op.batch_alter_table("judgments") as batch:
        batch.drop_index(op.f("ix_judgments_status_created_at"))
        batch.drop_column("policy")
        for name, column_type in COMPLETION_COLUMNS:
            batch.alter_column(name, existing_type=column_type, nullable=False)
