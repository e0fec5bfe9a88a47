"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(length=48), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_events_event"), ["event"], unique=False)

    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("sop_key", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("series_key", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_ae", sa.String(length=16), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("spool_name", sa.String(length=128), nullable=True),
        sa.Column("blob_digest", sa.String(length=64), nullable=True),
        sa.Column("reject_reason", sa.Text(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instances")),
        sa.UniqueConstraint("sop_key", name=op.f("uq_instances_sop_key")),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_instances_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_instances_study_key"), ["study_key"], unique=False)

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("dedupe_key", sa.String(length=128), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_token", sa.String(length=64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_jobs_dedupe_key")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
        batch_op.create_index("ix_jobs_state_run_after", ["state", "run_after"], unique=False)

    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
        sa.UniqueConstraint("study_key", "task", name="uq_labels_study_task"),
    )
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labels_study_key"), ["study_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_labels_task"), ["task"], unique=False)

    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=64), nullable=False),
        sa.Column("study_version", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("model_id", sa.String(length=64), nullable=True),
        sa.Column("superseded", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
        sa.UniqueConstraint("study_key", "task", "study_version", name="uq_results_version"),
    )
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_results_study_key"), ["study_key"], unique=False)

    op.create_table(
        "studies",
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("patient_key", sa.String(length=64), nullable=True),
        sa.Column("accession_key", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("first_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("study_key", name=op.f("pk_studies")),
    )
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_studies_accession_key"), ["accession_key"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_studies_patient_key"), ["patient_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_studies_state"), ["state"], unique=False)

    op.create_table(
        "vault_instances",
        sa.Column("sop_key", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sop_key", name=op.f("pk_vault_instances")),
    )
    with op.batch_alter_table("vault_instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_vault_instances_study_key"), ["study_key"], unique=False
        )

    op.create_table(
        "vault_studies",
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("study_key", name=op.f("pk_vault_studies")),
    )
    op.create_table(
        "series",
        sa.Column("series_key", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("body_part", sa.String(length=64), nullable=True),
        sa.Column("view_position", sa.String(length=16), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_key"], ["studies.study_key"], name=op.f("fk_series_study_key_studies")
        ),
        sa.PrimaryKeyConstraint("series_key", name=op.f("pk_series")),
    )
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_series_study_key"), ["study_key"], unique=False)

    op.create_table(
        "deid_instances",
        sa.Column("sop_key", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("series_key", sa.String(length=64), nullable=False),
        sa.Column("sop_class_uid", sa.String(length=64), nullable=False),
        sa.Column("blob_digest", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_key"], ["series.series_key"], name=op.f("fk_deid_instances_series_key_series")
        ),
        sa.ForeignKeyConstraint(
            ["study_key"], ["studies.study_key"], name=op.f("fk_deid_instances_study_key_studies")
        ),
        sa.PrimaryKeyConstraint("sop_key", name=op.f("pk_deid_instances")),
    )
    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deid_instances_series_key"), ["series_key"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deid_instances_study_key"), ["study_key"], unique=False
        )


def downgrade() -> None:

    with op.batch_alter_table("deid_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deid_instances_study_key"))
        batch_op.drop_index(batch_op.f("ix_deid_instances_series_key"))

    op.drop_table("deid_instances")
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_series_study_key"))

    op.drop_table("series")
    op.drop_table("vault_studies")
    with op.batch_alter_table("vault_instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vault_instances_study_key"))

    op.drop_table("vault_instances")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_state"))
        batch_op.drop_index(batch_op.f("ix_studies_patient_key"))
        batch_op.drop_index(batch_op.f("ix_studies_accession_key"))

    op.drop_table("studies")
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_results_study_key"))

    op.drop_table("results")
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_labels_task"))
        batch_op.drop_index(batch_op.f("ix_labels_study_key"))

    op.drop_table("labels")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_state_run_after")
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))

    op.drop_table("jobs")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_study_key"))
        batch_op.drop_index(batch_op.f("ix_instances_state"))

    op.drop_table("instances")
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_events_event"))
        batch_op.drop_index(batch_op.f("ix_audit_events_at"))

    op.drop_table("audit_events")
