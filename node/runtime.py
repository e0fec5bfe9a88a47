"""Open the node's parts (database, queue, keys) from its settings, once per process."""

from __future__ import annotations

from node.config import Settings
from node.jobs import JobContext
from node.keys import load_keys
from storage.db import Database
from storage.queue import SqlQueue


def open_database(settings: Settings) -> Database:
    return Database(
        settings.database_url,
        busy_timeout_ms=settings.database.busy_timeout_ms,
        pool_size=settings.database.pool_size,
    )


def open_context(settings: Settings, *, check_migrated: bool = True) -> JobContext:
    """The node's database, queue and keys; raises if the schema is not current."""
    keys = load_keys(settings.secret_path)
    db = open_database(settings)
    if check_migrated:
        db.check_migrated()
    queue = SqlQueue(db, default_max_attempts=settings.workers.max_attempts)
    return JobContext(settings=settings, db=db, queue=queue, keys=keys)
