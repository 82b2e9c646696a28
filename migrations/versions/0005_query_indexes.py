"""Add indexes for the auditor queries: judgments by model or heads, and verdict outcomes with their judgment.

judgments (model_name, created_at) and (heads_name, created_at) serve the
`model` and `heads` filters alone and with a time range. verdicts (constraint,
passed, judgment_id) replaces (constraint, passed), whose lookups it serves as
well. It also contains the judgment ids, so a `passed` filter reads them from
the index: on PostgreSQL 15, EXPLAIN of a listing shows an index-only scan in
id order and no sort, while SQLite 3.40 reads the index but still sorts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JUDGMENT_INDEXES = (("model_name", "created_at"), ("heads_name", "created_at"))


def upgrade() -> None:
    for columns in JUDGMENT_INDEXES:
        op.create_index(op.f(f"ix_judgments_{'_'.join(columns)}"), "judgments", list(columns))
    op.create_index(
        op.f("ix_verdicts_constraint_passed_judgment_id"), "verdicts", ["constraint", "passed", "judgment_id"]
    )
    op.drop_index(op.f("ix_verdicts_constraint_passed"), table_name="verdicts")


def downgrade() -> None:
    op.create_index(op.f("ix_verdicts_constraint_passed"), "verdicts", ["constraint", "passed"])
    op.drop_index(op.f("ix_verdicts_constraint_passed_judgment_id"), table_name="verdicts")
    for columns in JUDGMENT_INDEXES:
        op.drop_index(op.f(f"ix_judgments_{'_'.join(columns)}"), table_name="judgments")
