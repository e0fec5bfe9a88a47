"""blob references: de-identified instances are named by their pack record, not a digest

Revision ID: 0005_blob_refs
Revises: 0004_reports
Create Date: 2026-12-02

``blob_digest`` (the SHA-256 of a file of the earlier blob store) becomes ``blob_ref``: a
pack record's locator (:mod:`storage.blobs`), or the digest of a blob an earlier build
stored, which is still read. The index serves the sweep of unreferenced pack records.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_blob_refs"
down_revision = "0004_reports"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column(
            "blob_digest", new_column_name="blob_ref",
            existing_type=sa.String(length=64), type_=sa.String(length=128),
            existing_nullable=True,
        )
    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.alter_column(
            "blob_digest", new_column_name="blob_ref",
            existing_type=sa.String(length=64), type_=sa.String(length=128),
            existing_nullable=False,
        )
    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deid_instances_blob_ref"), ["blob_ref"], unique=False)


def downgrade() -> None:
    # A pack record's locator does not fit the old column, and builds before this revision
    # cannot read pack records: refuse, naming why, rather than fail half-way (PostgreSQL:
    # "value too long") or leave references nothing can read (SQLite).
    packed = op.get_bind().execute(sa.text(
        "SELECT (SELECT count(*) FROM deid_instances WHERE blob_ref LIKE '%@%')"
        " + (SELECT count(*) FROM instances WHERE blob_ref LIKE '%@%')"
    )).scalar_one()
    if packed:
        raise RuntimeError(
            f"cannot downgrade below 0005_blob_refs: {packed} row(s) name de-identified "
            "instances stored in the blob packs, which earlier builds cannot read; keep this "
            "schema (or restore the backup taken before the upgrade)"
        )
    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deid_instances_blob_ref"))
    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.alter_column(
            "blob_ref", new_column_name="blob_digest",
            existing_type=sa.String(length=128), type_=sa.String(length=64),
            existing_nullable=False,
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column(
            "blob_ref", new_column_name="blob_digest",
            existing_type=sa.String(length=128), type_=sa.String(length=64),
            existing_nullable=True,
        )
