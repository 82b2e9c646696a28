"""Add judgments.kind: a generation, or a score of text that the caller supplied.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every judgment before this revision came from a generation.
    with op.batch_alter_table("judgments") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), nullable=False, server_default="generation"))
        batch.create_index(op.f("ix_judgments_kind_created_at"), ["kind", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("judgments") as batch:
        batch.drop_index(op.f("ix_judgments_kind_created_at"))
        batch.drop_column("kind")
