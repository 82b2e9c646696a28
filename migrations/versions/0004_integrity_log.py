"""Add the integrity log: Merkle leaves and nodes, its size, signed tree heads, and erasures.

Judgments finished before this revision get their leaves when the server next
starts (AuditStore.append_missing_leaves), in id order.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "integrity_leaves",
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("judgment_id", sa.String(length=36), nullable=False),
        sa.Column("record_hash", sa.String(length=64), nullable=False),
        sa.Column("payload_hash", sa.String(length=64), nullable=False),
        sa.Column("leaf_hash", sa.String(length=64), nullable=False),
        sa.Column("hash_version", sa.Integer(), nullable=False),
        sa.Column("appended_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["judgment_id"], ["judgments.id"],
                                name=op.f("fk_integrity_leaves_judgment_id_judgments")),
        sa.PrimaryKeyConstraint("leaf_index", name=op.f("pk_integrity_leaves")),
        sa.UniqueConstraint("judgment_id", name=op.f("uq_integrity_leaves_judgment_id")),
    )
    op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("node_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("level", "node_index", name=op.f("pk_merkle_nodes")),
    )
    state = op.create_table(
        "integrity_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_integrity_state")),
    )
    op.bulk_insert(state, [{"id": 1, "tree_size": 0}])
    op.create_table(
        "tree_heads",
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.String(length=64), nullable=False),
        sa.Column("signed_at", sa.DateTime(), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("tree_size", name=op.f("pk_tree_heads")),
    )
    op.create_table(
        "erasures",
        sa.Column("judgment_id", sa.String(length=36), nullable=False),
        sa.Column("erased_at", sa.DateTime(), nullable=False),
        sa.Column("erased_by", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["judgment_id"], ["judgments.id"], name=op.f("fk_erasures_judgment_id_judgments")),
        sa.PrimaryKeyConstraint("judgment_id", name=op.f("pk_erasures")),
    )


def downgrade() -> None:
    for table in ("erasures", "tree_heads", "integrity_state", "merkle_nodes", "integrity_leaves"):
        op.drop_table(table)
