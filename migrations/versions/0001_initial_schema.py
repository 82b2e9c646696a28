"""Create the judgments, verdicts and traces tables.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Datetimes are naive UTC here. The application type adds the UTC offset on read.
    op.create_table(
        "judgments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("completed_at", sa.DateTime(), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("model_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("heads_name", sa.String(length=255), nullable=False),
        sa.Column("heads_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("finish_reason", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgments")),
    )
    op.create_index(op.f("ix_judgments_created_at"), "judgments", ["created_at"])
    op.create_index(op.f("ix_judgments_flagged_created_at"), "judgments", ["flagged", "created_at"])

    op.create_table(
        "verdicts",
        sa.Column("judgment_id", sa.String(length=36), nullable=False),
        sa.Column("constraint", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("min_score", sa.Float(), nullable=False),
        sa.Column("min_position", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["judgment_id"],
            ["judgments.id"],
            name=op.f("fk_verdicts_judgment_id_judgments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("judgment_id", "constraint", name=op.f("pk_verdicts")),
    )
    op.create_index(op.f("ix_verdicts_constraint_score"), "verdicts", ["constraint", "score"])
    op.create_index(op.f("ix_verdicts_constraint_passed"), "verdicts", ["constraint", "passed"])

    op.create_table(
        "traces",
        sa.Column("judgment_id", sa.String(length=36), nullable=False),
        sa.Column("format_version", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["judgment_id"],
            ["judgments.id"],
            name=op.f("fk_traces_judgment_id_judgments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("judgment_id", name=op.f("pk_traces")),
    )


def downgrade() -> None:
    # Children first, because their foreign keys point at judgments.
    op.drop_table("traces")
    op.drop_index(op.f("ix_verdicts_constraint_passed"), table_name="verdicts")
    op.drop_index(op.f("ix_verdicts_constraint_score"), table_name="verdicts")
    op.drop_table("verdicts")
    op.drop_index(op.f("ix_judgments_flagged_created_at"), table_name="judgments")
    op.drop_index(op.f("ix_judgments_created_at"), table_name="judgments")
    op.drop_table("judgments")
