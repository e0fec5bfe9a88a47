"""Append-only audit records (event kinds after PS3.15 Annex A.5); pseudonymous details only."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from storage.db import Database
from storage.models import AuditEvent


class AuditKind(StrEnum):
    ASSOCIATION_REJECTED = "association-rejected"
    INSTANCE_RECEIVED = "instance-received"
    INSTANCE_DUPLICATE = "instance-duplicate"
    STORE_FAILED = "store-failed"
    DEIDENTIFIED = "deidentified"
    INSTANCE_REJECTED = "instance-rejected"
    JOB_DEAD = "job-dead"
    LABELS_IMPORTED = "labels-imported"
    CONFIG_CHANGED = "config-changed"
    REPORT_CREATED = "report-created"
    """An SR was re-identified from the vault into the outbox (PHI leaves the vault)."""
    REPORT_EXPORTED = "report-exported"
    """A destination acknowledged an SR (PHI left the node), or refused it for good."""


def record(
    target: Database | Session,
    kind: AuditKind,
    *,
    outcome: str = "success",
    actor: str | None = None,
    **detail: Any,
) -> None:
    """Append one audit event, in *target*'s transaction if it is a session.

    Callers pass pseudonymous keys and non-identifying facts only (AE titles, statuses, counts).
    """
    row = AuditEvent(event=kind.value, outcome=outcome, actor=actor, detail=detail)
    if isinstance(target, Session):
        target.add(row)
        return
    with target.session() as session:
        session.add(row)
