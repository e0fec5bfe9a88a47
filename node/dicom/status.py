"""DIMSE status codes the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C).

Every status the SCP sends comes from :class:`Status`; the conformance statement
(``deploy/CONFORMANCE.md``) lists when each is used.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    """The instance is kept durably (encrypted spool + database) and queued."""
    OUT_OF_RESOURCES = 0xA700
    """Refused: the database is unavailable, the spool cannot be written, the data volume
    is below the free-space floor (the sender should retry later), or the instance exceeds
    the node's maximum instance size or inflation limit. Nothing was kept."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """Error: the dataset's SOP Class UID differs from the request's Affected SOP Class UID."""
    CANNOT_UNDERSTAND = 0xC000
    """Error: the dataset cannot be decoded (garbage or truncated)."""
    CANNOT_UNDERSTAND_MISSING_UID = 0xC001
    """Error: the dataset lacks a SOP Class, SOP Instance, Study or Series Instance UID."""
    CANNOT_UNDERSTAND_UID_MISMATCH = 0xC002
    """Error: the dataset's SOP Instance UID differs from the request's Affected SOP Instance
    UID."""
    PROCESSING_FAILURE = 0x0110
    """Failure: an unexpected error in the node; nothing was kept."""
