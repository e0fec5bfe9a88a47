"""Write audit records; fall back to an append-only local file when the database is down.

The refusal the SCP sends when the database is unavailable must still leave an audit trail,
so :func:`audit` appends the record as one JSON line to
``<data_dir>/audit-fallback.jsonl`` (fsynced) when the database write fails, and when that
file cannot be written either (the data volume is full: it is the database's volume too),
writes the record to the log. Records hold pseudonymous keys and non-identifying
facts only.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from storage.audit import AuditKind, record
from storage.db import Database
from storage.errors import StorageError

logger = logging.getLogger(__name__)

FALLBACK_NAME = "audit-fallback.jsonl"
_lock = threading.Lock()


def audit(
    db: Database,
    data_dir: Path,
    kind: AuditKind,
    *,
    outcome: str = "success",
    actor: str | None = None,
    **detail: Any,
) -> None:
    """Record an audit event in the database, or in the fallback file if that fails."""
    try:
        record(db, kind, outcome=outcome, actor=actor, **detail)
    except StorageError:
        append_fallback(data_dir, kind, outcome=outcome, actor=actor, **detail)


def append_fallback(
    data_dir: Path, kind: AuditKind, *, outcome: str, actor: str | None, **detail: Any
) -> None:
    line = json.dumps(
        {
            "at": datetime.now(UTC).isoformat(),
            "event": kind.value,
            "outcome": outcome,
            "actor": actor,
            "detail": detail,
        },
        sort_keys=True,
    )
    path = data_dir / FALLBACK_NAME
    try:
        with _lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        # The data volume is full or failing (the database shares it): the record goes to the
        # log, which the service manager keeps elsewhere (journald). It holds pseudonymous
        # keys and non-identifying facts only, like every audit record.
        logger.error(
            "audit record kept in the log only: cannot write %s (%s): %s",
            path, exc.strerror, line, extra={"audit": json.loads(line)},
        )
