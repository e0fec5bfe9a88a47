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
