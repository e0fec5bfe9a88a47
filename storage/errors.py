"""Errors raised by the persistence layer.

``storage`` imports nothing from ``node``; the node maps these to DICOM statuses and exit codes.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database, blob store or spool could not complete the operation."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or refused the operation."""


class CommitOutcomeUnknown(DatabaseUnavailable):
    """The database failed while committing: the transaction may or may not have landed."""


class NotMigrated(StorageError):
    """The database schema is not at the current revision; run `fednode db upgrade`."""


class SpoolError(StorageError):
    """The encrypted spool could not write, read or delete an item."""


class IntegrityError(StorageError):
    """A stored item failed its integrity check (authentication tag or digest mismatch)."""
