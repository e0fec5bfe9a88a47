"""The node's exception hierarchy and its mapping to CLI exit codes.

Every error the node raises on purpose derives from :class:`NodeError`; a subclass's docstring is
its default message. Third-party errors are translated at the boundary
(``raise ConfigError(...) from exc``). Errors from ``storage`` keep their own root
(:class:`storage.errors.StorageError`, since ``storage`` may not import ``node``) and are mapped
to exit codes here too.
"""

from __future__ import annotations

from enum import IntEnum

from storage.errors import DatabaseUnavailable, NotMigrated, StorageError


class ExitCode(IntEnum):
    """Numbered exit codes of the ``fednode`` CLI (documented in the README)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    SECRET = 4
    DATABASE = 5
    NOT_MIGRATED = 6
    NETWORK = 7
    DICOM = 8
    DEID = 9
    PLUGIN = 10
    INTERRUPTED = 130


class NodeError(Exception):
    """fednode could not complete the operation."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigError(NodeError):
    """The configuration is invalid."""

    exit_code = ExitCode.CONFIG


class SecretError(NodeError):
    """The master secret is missing, unreadable or has unsafe permissions."""

    exit_code = ExitCode.SECRET


class NetworkError(NodeError):
    """A DICOM peer could not be reached or refused the association."""

    exit_code = ExitCode.NETWORK


class DicomError(NodeError):
    """A DICOM operation failed."""

    exit_code = ExitCode.DICOM


class DeidError(NodeError):
    """An instance could not be de-identified."""

    exit_code = ExitCode.DEID


class MalformedDataset(DeidError):
    """The dataset's encoding is invalid (the message names offsets and tags, never values).

    Raised by the one walker of encoded DICOM (:mod:`node.dicom.encoding`): the SCP answers it
    with 0xC000 before acknowledging, the de-identifier with a repair attempt or a dead letter.
    """


class InstanceTooLarge(MalformedDataset):
    """The instance exceeds the node's maximum instance size ([dicom] max_instance_mb)."""


class RejectedInstance(DeidError):
    """The instance is not admitted (for example: possible burned-in text and no pixel rule)."""


class PluginError(NodeError):
    """A task plugin could not be loaded or failed."""

    exit_code = ExitCode.PLUGIN


def exit_code_for(exc: BaseException) -> ExitCode:
    """Return the CLI exit code for *exc*."""
    if isinstance(exc, NodeError):
        return exc.exit_code
    if isinstance(exc, NotMigrated):
        return ExitCode.NOT_MIGRATED
    if isinstance(exc, DatabaseUnavailable):
        return ExitCode.DATABASE
    if isinstance(exc, StorageError):
        return ExitCode.DATABASE
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILURE
