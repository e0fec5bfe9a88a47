"""Check a received dataset's encoding and read the four UIDs the node files it under.

The SCP must answer a failure for a dataset it cannot decode *before* acknowledging it, but it
must not pay for a full pydicom parse of every instance. :func:`inspect_dataset` runs the
node's one walker of encoded DICOM (:func:`node.dicom.encoding.check`: PS3.5 Section 7 tag,
VR, length; every item of every sequence, defined or undefined length, to the de-identifier's
depth limit; encapsulated pixel data fragment by fragment) without converting any value, and
decodes only the SOP Class, SOP Instance, Study Instance and Series Instance UIDs of the top
level. What it accepts, the de-identifier's walk accepts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from node.dicom.encoding import DEFLATED_LE, EXPLICIT_LE, check, inflate
from node.errors import MalformedDataset

SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_WANTED = frozenset((SOP_CLASS, SOP_INSTANCE, STUDY, SERIES))
_NAMES = ((SOP_CLASS, "SOPClassUID"), (SOP_INSTANCE, "SOPInstanceUID"),
          (STUDY, "StudyInstanceUID"), (SERIES, "SeriesInstanceUID"))


@dataclass(frozen=True)
class DatasetHeader:
    """The identifiers a received instance is filed under (originals: PHI, never persisted)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def inspect_dataset(
    raw: bytes | bytearray | memoryview,
    transfer_syntax: str,
    *,
    max_inflated: int | None = None,
) -> tuple[DatasetHeader | None, list[str]]:
    """Validate the encoding of *raw* (a dataset without File Meta) in *transfer_syntax*.

    Parameters
    ----------
    max_inflated
        For Deflated Explicit VR Little Endian: the most bytes the dataset may inflate to.

    Returns
    -------
    header, missing
        The header if all four UIDs are present, else ``None`` and the missing keywords.

    Raises
    ------
    MalformedDataset
        If the bytes are not a well-formed dataset in that transfer syntax.
    InstanceTooLarge
        If a deflated dataset inflates beyond *max_inflated*.
    """
    syntax = _syntax(transfer_syntax)
    data = raw
    if syntax == DEFLATED_LE:
        data, syntax = inflate(raw, max_inflated), EXPLICIT_LE
    if not data:
        raise MalformedDataset("the dataset is empty")
    found = check(data, syntax, _WANTED)
    values = {tag: value.decode("ascii", "replace").strip("\x00 ") for tag, value in found.items()}
    missing = [name for tag, name in _NAMES if not values.get(tag)]
    if missing:
        return None, missing
    return DatasetHeader(values[SOP_CLASS], values[SOP_INSTANCE], values[STUDY], values[SERIES]), []


@functools.lru_cache(maxsize=64)
def _syntax(transfer_syntax: str) -> str:
    return transfer_syntax.strip("\x00 ")
