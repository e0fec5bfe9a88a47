"""Typed SQLAlchemy 2 models. Every identifier in clear is a keyed pseudonym (never an original
UID, name or ID); originals live only in the encrypted vault columns."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Instance(Base):
    """One received SOP instance, known by its pseudonymous SOP Instance UID."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_key: Mapped[str] = mapped_column(String(64), unique=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    series_key: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spool_name: Mapped[str | None] = mapped_column(String(128))
    blob_ref: Mapped[str | None] = mapped_column(String(128))
    """Where its de-identified bytes are in the blob store (:mod:`storage.blobs`)."""
    reject_reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Study(Base):
    """A pseudonymous study: de-identified header facts and its assembly state."""

    __tablename__ = "studies"

    study_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    patient_key: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_key: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Series(Base):
    """A pseudonymous series with the de-identified header facts that tasks select on."""

    __tablename__ = "series"

    series_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))


class DeidInstance(Base):
    """A de-identified instance in the blob store (:mod:`storage.blobs`)."""

    __tablename__ = "deid_instances"

    sop_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_key: Mapped[str] = mapped_column(ForeignKey("studies.study_key"), index=True)
    series_key: Mapped[str] = mapped_column(ForeignKey("series.series_key"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    blob_ref: Mapped[str] = mapped_column(String(128), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class VaultStudy(Base):
    """AES-GCM encrypted original Patient / General Study header of one study."""

    __tablename__ = "vault_studies"

    study_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class VaultInstance(Base):
    """AES-GCM encrypted original UIDs (study, series, SOP instance, SOP class) of one instance."""

    __tablename__ = "vault_instances"

    sop_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)


class JobRow(Base):
    """A queued unit of work. ``payload`` holds pseudonymous keys only."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_run_after", "state", "run_after"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    state: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    dedupe_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """Append-only audit trail (PS3.15 Annex A.5 event kinds); pseudonymous identifiers only."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(48), index=True)
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)


class Label(Base):
    """A training label of one study for one task, keyed by the pseudonymous study UID."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("study_key", "task", name="uq_labels_study_task"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    label: Mapped[str] = mapped_column(String(64))
    imported_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Result(Base):
    """A task's result for one version of a study; a newer version supersedes older ones.

    One row per ``(study_key, task, study_version)`` (the ``infer`` job's idempotence rests on
    that constraint). ``study_key`` is the pseudonymous Study Instance UID; nothing here is PHI.

    Columns: ``label`` (the class :meth:`plugins.base.TaskPlugin.decide` chose), ``probability``
    (of the task's positive class, after the node's sigmoid), ``model_id`` and
    ``model_version`` (as the inference service published them), ``key_id`` (the node's CKKS
    key the input was encrypted under; results keep it after a key rotation), ``timings``
    (seconds per step: ``preprocess``, ``encrypt``, ``service``, ``decrypt``, ``total``),
    ``bytes_sent`` / ``bytes_received`` (ciphertext bytes on the wire for this study, the
    one-off context registration excluded) and ``superseded`` (a newer study version has a
    result of its own).
    """

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("study_key", "task", "study_version", name="uq_results_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    task: Mapped[str] = mapped_column(String(64))
    study_version: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    model_id: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    key_id: Mapped[str | None] = mapped_column(String(64))
    timings: Mapped[dict[str, float] | None] = mapped_column(JSON)
    bytes_sent: Mapped[int | None] = mapped_column(Integer)
    bytes_received: Mapped[int | None] = mapped_column(Integer)
    superseded: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class HEKey(Base):
    """A CKKS key of the node for one task encoding, its secret part sealed (AES-256-GCM).

    ``sealed_secret`` is the TenSEAL context with its secret key, encrypted under a key derived
    from the master secret (:mod:`node.keys`); it is never stored in clear. ``encoding`` is the
    digest of the CKKS parameters the key belongs to. A key is used for new inputs until
    ``rotate_after``; then a new key is made and this one is only kept (``retired_at``) so that
    nothing that refers to it breaks.
    """

    __tablename__ = "he_keys"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(64), index=True)
    encoding: Mapped[str] = mapped_column(String(64))
    sealed_secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    rotate_after: Mapped[datetime] = mapped_column(UTCDateTime)
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NodeMeta(Base):
    """Small facts about the node itself (for example the master secret's key check value).

    Never PHI and never a key: a key check value is an HMAC of a fixed label under a derived
    key, from which the key cannot be recovered.
    """

    __tablename__ = "node_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Report(Base):
    """A Structured Report built from one result; the SR itself is encrypted in the outbox.

    Nothing here is PHI: the SR's UIDs are derived from the node's keys and are not stored.
    ``outbox_name`` is cleared once the outbox file is deleted (after the retention period).
    """

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), unique=True)
    study_key: Mapped[str] = mapped_column(String(64), index=True)
    task: Mapped[str] = mapped_column(String(64))
    study_version: Mapped[int] = mapped_column(Integer)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    outbox_name: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    exported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReportExport(Base):
    """The delivery of one report to one destination (one ``export`` job)."""

    __tablename__ = "report_exports"
    __table_args__ = (
        UniqueConstraint("report_id", "destination", name="uq_report_exports_destination"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
