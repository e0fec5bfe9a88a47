"""Property tests: random nested datasets, private blocks and odd VRs never crash the engine and
never leave an identifying value behind (PS3.15 E.1.1: "all instances of the Attributes ...
whether contained in the main dataset or embedded in an Item of a Sequence of Items")."""

from __future__ import annotations

import string
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from tests.unit.deid_support import encode, engine, read

# The strategies draw tags the data dictionary does not know: pydicom warns when it reads them.
pytestmark = pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning")

UID_ROOT = "1.2.826.0.1.3680043.10.999."
MARK = st.text(string.ascii_uppercase + string.digits, min_size=6, max_size=10).map(
    lambda s: "PHI" + s
)
UIDS = st.integers(min_value=10**6, max_value=10**18).map(lambda n: UID_ROOT + str(n))
DATES = st.dates(
    min_value=__import__("datetime").date(2001, 1, 1),
    max_value=__import__("datetime").date(2001, 12, 31),
).map(lambda d: d.strftime("%Y%m%d"))

# Identifying attributes (Table E.1-1 rows other than K/C, or PN/DA/DT/UI by VR).
IDENTIFYING: list[tuple[int, str]] = [
    (0x00100010, "PN"),
    (0x00100020, "LO"),
    (0x00101040, "LO"),
    (0x00080080, "LO"),
    (0x00080090, "PN"),
    (0x00080050, "SH"),
    (0x00081070, "PN"),
    (0x00081010, "SH"),
    (0x00200010, "SH"),
    (0x00204000, "LT"),
    (0x00400254, "LO"),
    (0x00321032, "PN"),
    (0x00081048, "PN"),
    (0x0040A123, "PN"),
    (0x00181000, "LO"),
    (0x00081030, "LO"),
    (0x00100030, "DA"),
    (0x00080020, "DA"),
    (0x00080021, "DA"),
    (0x0008002A, "DT"),
    (0x00080018, "UI"),
    (0x00081155, "UI"),
    (0x00200052, "UI"),
    (0x0020000E, "UI"),
    (0x0040A124, "UI"),
]
# Free text the table does not name: cleaned of the instance's identifying values.
FREE_TEXT: list[tuple[int, str]] = [
    (0x00281055, "LO"),
    (0x0040A160, "UT"),
    (0x00080104, "LO"),
    (0x00181210, "SH"),
]
DESCRIPTORS = {0x00204000, 0x00400254, 0x00081030}
"""Kept, cleaned, by the Clean Descriptors Option: their values count as identifying only
without it."""
SEQUENCES = [0x00081140, 0x0040A730, 0x00082112, 0x00081115, 0x00400275]
SAFE: list[tuple[int, str, Any]] = [
    (0x00280010, "US", st.integers(0, 65535)),
    (0x00281052, "DS", st.integers(-5000, 5000).map(str)),
    (0x00200013, "IS", st.integers(0, 9999).map(str)),
    (0x00180050, "DS", st.floats(0.1, 10, allow_nan=False).map(lambda f: f"{f:.3f}")),
    (0x00080060, "CS", st.sampled_from(["CT", "MR", "OT"])),
    (0x00209057, "UL", st.integers(0, 2**32 - 1)),
    (0x00189089, "FD", st.floats(-1e6, 1e6, allow_nan=False).map(lambda f: [f, f, f])),
    (0x00280106, "SS", st.integers(-32768, 32767)),
    (0x00209165, "AT", st.sampled_from([0x00100010, 0x00080020])),
    (
        0x00660040,
        "OL",
        st.binary(min_size=0, max_size=16).map(lambda b: b + b"\x00" * (-len(b) % 4)),
    ),
    (0x00720082, "SV", st.integers(-(2**63), 2**63 - 1)),
    (0x00720083, "UV", st.integers(0, 2**64 - 1)),
    (0x00720085, "OV", st.binary(max_size=16).map(lambda b: b + b"\x00" * (-len(b) % 8))),
    (0x00400031, "UT", st.just("local namespace")),
    (0x00081190, "UR", st.just("http://example.invalid/wado")),
]


@st.composite
def item(draw: st.DrawFn, depth: int, marks: list[str], descriptors: list[str]) -> Dataset:
    ds = Dataset()
    for tag, vr in draw(st.lists(st.sampled_from(IDENTIFYING), max_size=6, unique=True)):
        if vr == "UI":
            value: Any = draw(UIDS)
        elif vr == "DA":
            value = draw(DATES)
        elif vr == "DT":
            value = draw(DATES) + "101010"
        elif vr == "PN":
            value = draw(MARK) + "^" + draw(MARK)
            marks.extend(value.split("^"))
        else:
            value = draw(MARK)
            (descriptors if tag in DESCRIPTORS else marks).append(value)
        ds.add_new(tag, vr, value)
    for tag, vr, strategy in draw(
        st.lists(st.sampled_from(SAFE), max_size=4, unique_by=lambda x: x[0])
    ):
        ds.add_new(tag, vr, draw(strategy))
    if draw(st.booleans()):
        group = draw(st.sampled_from([0x0009, 0x0011, 0x0029, 0x7FDF]))
        ds.add_new(group << 16 | 0x0010, "LO", "HYPOTHESIS CREATOR")
        ds.add_new(group << 16 | 0x1001, "LO", draw(MARK))
        ds.add_new(group << 16 | 0x1002, "UN", draw(st.binary(max_size=12)))
        if depth < 2:
            ds.add_new(
                group << 16 | 0x1003, "SQ", Sequence([draw(item(depth + 1, marks, descriptors))])
            )
    if draw(st.booleans()):
        ds.add_new(0x00EE0010, "UN", draw(MARK).encode())  # unknown public tag
    if depth < 3:
        for tag in draw(st.lists(st.sampled_from(SEQUENCES), max_size=2, unique=True)):
            children = draw(st.lists(item(depth + 1, marks, descriptors), min_size=0, max_size=2))
            ds.add_new(tag, "SQ", Sequence(children))
    return ds


@st.composite
def dataset(draw: st.DrawFn) -> tuple[Dataset, list[str], list[str], str]:
    marks: list[str] = []
    descriptors: list[str] = []
    ds = draw(item(0, marks, descriptors))
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = draw(UIDS)
    ds.StudyInstanceUID = draw(UIDS)
    ds.Modality = "CT"
    if marks:
        for tag, vr in draw(st.lists(st.sampled_from(FREE_TEXT), max_size=3, unique=True)):
            ds.add_new(
                tag,
                vr,
                f"see {draw(st.sampled_from(marks))}, then {draw(st.sampled_from(marks)).lower()}",
            )
    syntax = draw(
        st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
    )
    return ds, marks, descriptors, syntax


def _all_values(ds: Dataset) -> tuple[set[str], set[str]]:
    uids, dates = set(), set()
    for elem in ds.iterall():
        if elem.VR == "UI" and str(elem.value).startswith(UID_ROOT):
            uids.add(str(elem.value))
        if elem.VR in ("DA", "DT") and elem.value:
            dates.add(str(elem.value)[:8])
    return uids, dates


ENGINE = engine()
ENGINE_OPTIONS = engine(
    clean_descriptors=True,
    clean_structured_content=True,
    retain_safe_private=True,
    longitudinal="off",
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dataset(), st.booleans())
def test_no_crash_no_residue(
    sample: tuple[Dataset, list[str], list[str], str], with_options: bool
) -> None:
    ds, marks, descriptors, syntax = sample
    raw = encode(ds, syntax)
    e = ENGINE_OPTIONS if with_options else ENGINE
    result = e.deidentify(raw, syntax, repair=False)
    assert result.residue == ()
    out = result.data
    for mark in marks + ([] if with_options else descriptors):
        assert mark.encode() not in out, mark
        assert mark.lower().encode() not in out, mark
    uids, dates = _all_values(ds)
    for uid in uids:
        assert uid.encode() not in out
    for date in dates:
        assert date.encode() not in out
    parsed = read(out)
    for _ in parsed.iterall():
        pass
    assert parsed.PatientIdentityRemoved == "YES"
    assert not any(elem.tag.is_private for elem in parsed.iterall())
    assert pydicom.uid.UID(parsed.file_meta.TransferSyntaxUID) == syntax
