"""Domain records (frozen dataclasses) and states (StrEnums) shared by storage and the node."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class InstanceState(StrEnum):
    RECEIVED = "received"
    """Encrypted in the spool, waiting for de-identification."""
    DEIDENTIFIED = "deidentified"
    """De-identified copy in the blob store; spool record deleted."""
    REJECTED = "rejected"
    """Not admitted (reason kept); spool record deleted after the retention period."""
    FAILED = "failed"
    """De-identification failed after every retry (its job is dead-lettered)."""


class StudyState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(StrEnum):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    DEAD = "dead"


@dataclass(frozen=True)
class Job:
    """A leased or listed job. ``payload`` holds pseudonymous keys only, never PHI."""

    id: int
    kind: str
    state: JobState
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    run_after: datetime
    created_at: datetime
    lease_token: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    last_error: str | None = None
    dedupe_key: str | None = None
    updated_at: datetime | None = field(default=None, compare=False)


class ReportState(StrEnum):
    PENDING = "pending"
    """The SR is in the encrypted outbox; not every destination has acknowledged it."""
    EXPORTED = "exported"
    """Every destination acknowledged the SR (it leaves the outbox after the retention)."""
    SUPERSEDED = "superseded"
    """A report of a newer study version replaced it before it was sent; it is not sent."""


class ExportState(StrEnum):
    QUEUED = "queued"
    """Waiting for its (next) attempt."""
    SENT = "sent"
    """The destination acknowledged the C-STORE."""
    DEAD = "dead"
    """Every attempt failed (or the destination refused for good); ``fednode exports retry``."""
    CANCELLED = "cancelled"
    """Not sent: the report was superseded first."""
