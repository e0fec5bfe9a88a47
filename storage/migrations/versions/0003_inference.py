"""inference: result provenance (model version, key id, timings, bytes) and the node's CKKS keys

Revision ID: 0003_inference
Revises: 0002_node_meta
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_inference"
down_revision = "0002_node_meta"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_version", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("key_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("timings", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("bytes_sent", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("bytes_received", sa.Integer(), nullable=True))

    op.create_table(
        "he_keys",
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("encoding", sa.String(length=64), nullable=False),
        sa.Column("sealed_secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotate_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_he_keys")),
    )
    with op.batch_alter_table("he_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_he_keys_task"), ["task"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("he_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_he_keys_task"))
    op.drop_table("he_keys")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("bytes_received")
        batch_op.drop_column("bytes_sent")
        batch_op.drop_column("timings")
        batch_op.drop_column("key_id")
        batch_op.drop_column("model_version")
