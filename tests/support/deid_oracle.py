"""Test oracle for de-identification: the identifying values of an input, read with pydicom.

Independent of the engine's own byte parser: the input is read by pydicom, every element
(nested ones included, via ``iterall``) is classified with Table E.1-1 as resolved for the
options (PS3.15 E.1.1) and, for attributes the table does not name, by VR (PN, DA, DT, UI), and
the values of identifying elements are looked for in the output bytes outside the pixel data.

Matching follows the documented limits of the residue check (short values cannot be told
apart from ordinary content): a value must have at least 4 characters with a letter (3 for a
component of a person name) or at least 6 digits, and it matches where it is not part of a
longer alphanumeric run (for UIDs and numbers: a longer number or UID).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator

import pydicom
from pydicom.dataset import Dataset

from node.deid.engine import CLASS_UID_TAGS, DUMMY_TEXT
from node.deid.profile import Action, Profile

TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR"}
ALWAYS = {
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "RequestingPhysician", "NameOfPhysiciansReadingStudy", "StationName", "DeviceSerialNumber",
    "StudyID", "PatientBirthName", "PatientMotherBirthName", "MedicalRecordLocator",
}


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data), force=True)


def _identifying(elem: pydicom.DataElement, profile: Profile, temporal: str) -> bool:
    vr = elem.VR
    keyword = elem.keyword
    action = profile.action(int(elem.tag))
    if action is None:
        if keyword in ALWAYS:
            return True
        if vr in ("DA", "DT"):
            return temporal != "full"
        if vr == "PN":
            return True
        return vr == "UI" and int(elem.tag) not in CLASS_UID_TAGS
    if action is Action.KEEP:
        return False
    if action is Action.CLEAN:
        return vr in ("DA", "DT")
    return True


def _values(elem: pydicom.DataElement) -> Iterator[str]:
    value = elem.value
    items = value if isinstance(value, list | pydicom.multival.MultiValue) else [value]
    for item in items:
        if item is None:
            continue
        text = str(item).strip(" \x00")
        if not text:
            continue
        if elem.VR == "PN":
            yield text
            for part in re.split(r"[\^=]", text):
                if len(part.strip()) >= 3:
                    yield part.strip()
        elif elem.VR == "DT":
            yield re.split(r"[+-]", text, maxsplit=1)[0]
        else:
            yield text


def identifying_values(
    ds: Dataset, profile: Profile, temporal: str = "modified"
) -> dict[str, set[str]]:
    """keyword -> identifying values of *ds* (nested elements included)."""
    found: dict[str, set[str]] = {}
    kept: set[str] = set()
    for elem in ds.iterall():
        if elem.tag.is_private or elem.VR == "SQ" or elem.tag.group in (0x0002,):
            continue
        if elem.VR not in TEXT_VRS | {"PN", "UI", "DA", "DT"}:
            continue
        if not _identifying(elem, profile, temporal):
            if profile.action(int(elem.tag)) is Action.KEEP:
                kept.update(_values(elem))
            continue
        for text in _values(elem):
            if elem.VR == "UI" and text.startswith("1.2.840.10008."):
                continue
            letters = any(c.isalpha() for c in text)
            if letters and len(text) < (3 if elem.VR == "PN" else 4):
                continue
            if not letters and len(text) < 6:
                continue
            found.setdefault(elem.keyword or str(elem.tag), set()).add(text)
    for values in found.values():
        values -= kept
        values.discard(DUMMY_TEXT.decode())
    return {k: v for k, v in found.items() if v}


def header_bytes(data: bytes) -> bytes:
    """The output without the value of its top-level pixel data."""
    ds = read(data)
    for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009):
        if tag in ds:
            value = ds[tag].value
            if isinstance(value, bytes) and len(value) > 16:
                data = data.replace(value, b"", 1)
    return data


def leaks(output: bytes, identifying: dict[str, set[str]]) -> dict[str, set[str]]:
    """The identifying values found in *output* (outside the pixel data)."""
    hay = header_bytes(output)
    out: dict[str, set[str]] = {}
    for keyword, values in identifying.items():
        for value in values:
            raw = value.encode("latin-1", "replace")
            if not raw or raw not in hay:
                continue
            esc = re.escape(raw)
            pattern = rb"(?<![0-9A-Za-z.])" + esc + rb"(?![0-9A-Za-z]|\.[0-9])"
            if re.search(pattern, hay):
                out.setdefault(keyword, set()).add(value)
    return out
