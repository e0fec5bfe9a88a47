"""The structure walk that decides, before acknowledging, whether a dataset can be decoded."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from node.dicom.inspect import inspect_dataset
from node.errors import MalformedDataset
from tests.support.dicomgen import FakeStudy, ct_instance


def encode(ds: Dataset, ts: str) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian = ts != ExplicitVRBigEndian
    out.is_implicit_VR = ts == ImplicitVRLittleEndian
    write_dataset(out, ds)
    return out.getvalue()


@pytest.fixture
def ct() -> Dataset:
    ds = ct_instance(FakeStudy(), generate_uid(), 1, 0, size=16)
    seq_item = Dataset()
    seq_item.ReferencedSOPClassUID = ds.SOPClassUID
    seq_item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = [seq_item]
    return ds


@pytest.mark.parametrize(
    "ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_valid_dataset_gives_its_uids(ct: Dataset, ts: str) -> None:
    header, missing = inspect_dataset(encode(ct, ts), ts)
    assert missing == [] and header is not None
    assert header.sop_instance_uid == ct.SOPInstanceUID
    assert header.sop_class_uid == ct.SOPClassUID
    assert header.study_instance_uid == ct.StudyInstanceUID
    assert header.series_instance_uid == ct.SeriesInstanceUID


def test_deflated(ct: Dataset) -> None:
    raw = encode(ct, ExplicitVRLittleEndian)
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    header, _ = inspect_dataset(deflated, DeflatedExplicitVRLittleEndian)
    assert header is not None and header.sop_instance_uid == ct.SOPInstanceUID
    with pytest.raises(MalformedDataset, match="inflate"):
        inspect_dataset(b"\x00garbage" * 10, DeflatedExplicitVRLittleEndian)


def test_encapsulated_pixel_data_and_undefined_length_sequences() -> None:
    path = get_testdata_file("JPEG2000.dcm")
    ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    raw = Path(path).read_bytes()[_dataset_offset(path) :]
    header, missing = inspect_dataset(raw, ts)
    assert header is not None, missing
    with pytest.raises(MalformedDataset):
        inspect_dataset(raw[:-20], ts)


def _dataset_offset(path: str) -> int:
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.tell()


@pytest.mark.parametrize("cut", [1, 7, 100, 400])
def test_truncated_dataset_is_malformed(ct: Dataset, cut: int) -> None:
    raw = encode(ct, ExplicitVRLittleEndian)
    with pytest.raises(MalformedDataset):
        inspect_dataset(raw[:-cut], ExplicitVRLittleEndian)


@pytest.mark.parametrize("seed", range(5))
def test_garbage_is_malformed_or_lacks_uids(seed: int) -> None:
    import random

    garbage = random.Random(seed).randbytes(2000)
    for ts in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        try:
            header, missing = inspect_dataset(garbage, ts)
        except MalformedDataset:
            continue
        assert header is None and missing


def test_missing_uids_are_named(ct: Dataset) -> None:
    del ct.SeriesInstanceUID
    header, missing = inspect_dataset(encode(ct, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert header is None and missing == ["SeriesInstanceUID"]


def test_empty_dataset() -> None:
    with pytest.raises(MalformedDataset, match="empty"):
        inspect_dataset(b"", ExplicitVRLittleEndian)


def test_pydicom_truncated_test_files_are_refused() -> None:
    for name in ("MR_truncated.dcm", "rtplan_truncated.dcm"):
        path = get_testdata_file(name)
        ts = dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID
        raw = Path(path).read_bytes()[_dataset_offset(path) :]
        with pytest.raises(MalformedDataset, match=r"truncated|runs past"):
            inspect_dataset(raw, ts)


# -- the receive check against the de-identifier (issue 18) -----------------------------------
def _nest(depth: int, *, bad_inner_length: bool = False, undefined: bool = False) -> bytes:
    """A dataset with the four UIDs and a (0008,1140) sequence nested *depth* items deep."""
    import struct

    def ui(group: int, elem: int, value: str) -> bytes:
        raw = value.encode() + (b"\x00" if len(value) % 2 else b"")
        return struct.pack("<HH2sH", group, elem, b"UI", len(raw)) + raw

    inner = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 0x20 if bad_inner_length else 4)
    inner += b"CODE"
    for _ in range(depth):
        if undefined:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner
            item += struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
            inner = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + item
            inner += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        else:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, len(item)) + item
    return (
        ui(0x0008, 0x0016, "1.2.840.10008.5.1.4.1.1.2") + ui(0x0008, 0x0018, generate_uid())
        + inner + ui(0x0020, 0x000D, generate_uid()) + ui(0x0020, 0x000E, generate_uid())
    )


def _malformed_inputs(ct: Dataset) -> list[tuple[str, bytes]]:
    good = encode(ct, ExplicitVRLittleEndian)
    return [
        ("nested 200 deep, defined lengths", _nest(200)),
        ("nested 3000 deep, defined lengths", _nest(3000)),
        ("nested 200 deep, undefined lengths", _nest(200, undefined=True)),
        ("wrong length inside a defined-length item", _nest(3, bad_inner_length=True)),
        ("wrong length inside an undefined-length item", _nest(3, bad_inner_length=True,
                                                              undefined=True)),
        ("truncated", good[:-7]),
        ("invalid VR", good[:4] + b"\x01\x02" + good[6:]),
    ]


def test_the_receive_check_refuses_exactly_what_the_deidentifier_cannot_walk(ct: Dataset) -> None:
    from tests.unit.deid_support import engine

    deid = engine()
    for name, raw in _malformed_inputs(ct):
        with pytest.raises(MalformedDataset):
            inspect_dataset(raw, ExplicitVRLittleEndian)
            pytest.fail(f"the receive check accepted: {name}")
        with pytest.raises(MalformedDataset):  # the de-identifier's own walk, without repair
            deid.deidentify(raw, ExplicitVRLittleEndian, repair=False)
            pytest.fail(f"the de-identifier accepted: {name}")
    # ... and what it accepts, the de-identifier de-identifies (up to the same depth limit).
    for raw in (_nest(40), _nest(40, undefined=True), encode(ct, ExplicitVRLittleEndian)):
        header, missing = inspect_dataset(raw, ExplicitVRLittleEndian)
        assert header is not None, missing
        result = deid.deidentify(raw, ExplicitVRLittleEndian, repair=False)
        assert result.data and not result.residue
