"""De-identification of every file of pydicom's test data and of ``pydicom-data`` that pydicom
can read: no identifying value left, references consistent across files, and ``dciodvfy``
reports no error on an output that it does not report on its input (PS3.15 Annex E)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset

from node.config import DeidSection, PixelRule
from node.deid.engine import Deidentifier, DeidResult, normalize
from node.deid.pseudonyms import uid_pseudonym
from node.errors import RejectedInstance
from tests.support.deid_oracle import identifying_values, leaks

SITE = b"\x42" * 32
CATCH_ALL = PixelRule(name="catch-all", rectangles=[(0, 0, 2, 2)])
"""Admit every gated instance (cleaning a corner) so that every file reaches the profile."""
NOT_ADMITTED = (
    "DICOMDIR",
    "no SOP Class UID or SOP Instance UID",
    "cannot be decoded to clean it",  # gated, and no installed decoder reads its pixels
    "the instance is truncated",  # MR_truncated.dcm: 8130 of its 8192 pixel bytes
    "Number of Frames is not an integer",  # badVR.dcm: "1A" (pydicom cannot decode it either)
)


def _read(data: bytes | str) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(data, str):
            return pydicom.dcmread(data, force=True)
        return pydicom.dcmread(io.BytesIO(data), force=True)


@cache
def corpus() -> tuple[str, ...]:
    """Every test file pydicom and pydicom-data ship that pydicom can read."""
    readable = []
    for path in sorted(get_testdata_files()):
        try:
            _read(path)
        except Exception:
            continue
        readable.append(path)
    return tuple(readable)


@cache
def engine() -> Deidentifier:
    return Deidentifier(DeidSection(pixel_rules=[CATCH_ALL]), SITE)


@cache
def outcomes() -> dict[str, DeidResult | RejectedInstance]:
    results: dict[str, DeidResult | RejectedInstance] = {}
    for path in corpus():
        try:
            results[path] = engine().deidentify_file(Path(path).read_bytes())
        except RejectedInstance as exc:
            results[path] = exc
    return results


def done() -> Iterator[tuple[str, DeidResult]]:
    for path, outcome in outcomes().items():
        if isinstance(outcome, DeidResult):
            yield path, outcome


def test_every_readable_file_is_de_identified_or_not_an_instance() -> None:
    assert len(corpus()) > 200  # pydicom's files and pydicom-data's
    assert any("data_store" in p for p in corpus())
    for path, outcome in outcomes().items():
        if isinstance(outcome, RejectedInstance):
            assert any(reason in str(outcome) for reason in NOT_ADMITTED), (path, outcome)
    assert sum(1 for _ in done()) > 200


def test_no_identifying_value_remains() -> None:
    failures = {}
    checked = 0
    for path, result in done():
        assert result.residue == (), path
        values = identifying_values(_read(path), engine().profile)
        checked += sum(len(v) for v in values.values())
        found = leaks(result.data, values)
        if found:
            failures[Path(path).name] = found
    assert failures == {}
    assert checked > 2000  # names, IDs, dates, UIDs, institutions, free text of the corpus


def test_retained_values_are_kept_when_an_option_says_so() -> None:
    keep = Deidentifier(
        DeidSection(pixel_rules=[CATCH_ALL], retain_institution_identity=True,
                    retain_device_identity=True, longitudinal="full", retain_uids=True),
        SITE,
    )
    checked = 0
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "emri_small.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        before = _read(path)
        after = _read(keep.deidentify_file(Path(path).read_bytes()).data)
        for keyword in ("InstitutionName", "StationName", "StudyDate", "SOPInstanceUID",
                        "DeviceSerialNumber"):
            if before.get(keyword):
                assert after.get(keyword) == before.get(keyword), (name, keyword)
                checked += 1
        if before.get("PatientName"):
            assert after.PatientName != before.PatientName
    assert checked >= 8


# -- references ---------------------------------------------------------------------------------


def _uid_values(ds: Dataset) -> list[tuple[str, str]]:
    return [(e.keyword, str(v)) for e in ds.iterall() if e.VR == "UI"
            for v in (e.value if isinstance(e.value, list | pydicom.multival.MultiValue)
                      else [e.value]) if v]


def test_every_output_uid_is_registered_a_class_or_the_pseudonym_of_an_input_uid() -> None:
    for path, result in done():
        inputs = {v for _, v in _uid_values(_read(path))}
        mapped = {uid_pseudonym(SITE, v) for v in inputs}
        for keyword, value in _uid_values(_read(result.data)):
            if value.startswith("1.2.840.10008.") or value in inputs:
                assert keyword in ("SOPClassUID", "ReferencedSOPClassUID", "CodingSchemeUID",
                                   "MediaStorageSOPClassUID", "TransferSyntaxUID",
                                   "ImplementationClassUID", "SOPClassesInStudy",
                                   "MappingResourceUID") or value.startswith("1.2.840.10008."), (
                    path, keyword)
                continue
            assert value in mapped, (Path(path).name, keyword)


def _save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def test_rt_plan_structure_set_and_dose_stay_linked() -> None:
    plan = _read(get_testdata_file("rtplan.dcm") or "")
    struct = _read(get_testdata_file("rtstruct.dcm") or "")
    dose = _read(get_testdata_file("rtdose.dcm") or "")
    for ds in (struct, dose):
        ds.StudyInstanceUID = plan.StudyInstanceUID
        ds.PatientID = plan.PatientID
    plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID = struct.SOPInstanceUID
    dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID = plan.SOPInstanceUID
    frame = struct.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    dose.FrameOfReferenceUID = frame
    e = engine()
    out = {name: _read(e.deidentify_file(_save(ds)).data)
           for name, ds in (("plan", plan), ("struct", struct), ("dose", dose))}
    assert (out["plan"].ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
            == out["struct"].SOPInstanceUID)
    assert (out["dose"].ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
            == out["plan"].SOPInstanceUID)
    assert (out["struct"].ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
            == out["dose"].FrameOfReferenceUID != frame)
    contour_refs = {
        str(c.ReferencedSOPInstanceUID)
        for roi in out["struct"].ROIContourSequence for ci in roi.ContourSequence
        for c in ci.get("ContourImageSequence", [])
    }
    originals = {
        str(c.ReferencedSOPInstanceUID)
        for roi in struct.ROIContourSequence for ci in roi.ContourSequence
        for c in ci.get("ContourImageSequence", [])
    }
    assert contour_refs == {uid_pseudonym(SITE, u) for u in originals}
    assert len({str(o.StudyInstanceUID) for o in out.values()}) == 1
    assert len({str(o.PatientID) for o in out.values()}) == 1


def test_segmentation_references_its_source_images() -> None:
    seg = _read(get_testdata_file("liver.dcm") or "")
    refs = [str(i.ReferencedSOPInstanceUID)
            for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    out = _read(engine().deidentify_file(_save(seg)).data)
    out_refs = [str(i.ReferencedSOPInstanceUID)
                for s in out.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert out_refs == [uid_pseudonym(SITE, r) for r in refs]
    # a source image de-identified on its own gets exactly the referenced UID
    source = _read(get_testdata_file("CT_small.dcm") or "")
    source.SOPInstanceUID = refs[0]
    source.SeriesInstanceUID = seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    ct_out = _read(engine().deidentify_file(_save(source)).data)
    assert ct_out.SOPInstanceUID == out_refs[0]
    assert ct_out.SeriesInstanceUID == out.ReferencedSeriesSequence[0].SeriesInstanceUID
    frame_refs = {
        str(src.ReferencedSOPInstanceUID)
        for frame in out.PerFrameFunctionalGroupsSequence
        for der in frame.get("DerivationImageSequence", [])
        for src in der.SourceImageSequence
    }
    assert frame_refs and frame_refs <= set(out_refs)


def test_structured_report_references() -> None:
    sr = _read(get_testdata_file("test-SR.dcm") or "")
    original = {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    out = _read(engine().deidentify_file(_save(sr)).data)
    mapped = {str(e.value) for e in out.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert original and mapped == {uid_pseudonym(SITE, u) for u in original}


# -- dciodvfy -------------------------------------------------------------------------------------

_VALUE = re.compile(r"<[^>]*>|\[\d+\]|= \S+")


def _errors(path: str) -> set[str]:
    proc = subprocess.run(["dciodvfy", "-new", path], capture_output=True, text=True,
                          timeout=120)
    return {_VALUE.sub("<>", line) for line in (proc.stdout + proc.stderr).splitlines()
            if line.startswith("Error")}


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_dciodvfy_reports_no_new_error() -> None:
    """Every output against its input, in parallel (about 420 runs; some 15 s on 2 cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for i, (path, result) in enumerate(done()):
            out = os.path.join(tmp, f"{i}.dcm")
            Path(out).write_bytes(result.data)
            pairs.append((path, out))

        def compare(pair: tuple[str, str]) -> tuple[str, set[str]]:
            src, out = pair
            before = _errors(src)
            if any("Dicom dataset read failed" in e for e in before):
                # dciodvfy cannot read the input (deflated, malformed): compare with
                # pydicom's well-formed reading of it instead
                body, syntax = normalize(Path(src).read_bytes())
                ds = _read(Path(src).read_bytes())
                fixed = os.path.join(tmp, f"{Path(out).stem}-in.dcm")
                with open(fixed, "wb") as fh:
                    fh.write(_part10(ds, body, syntax))
                before = _errors(fixed)
            return src, _errors(out) - before

        with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) * 2) as pool:
            new = {Path(src).name: errs for src, errs in pool.map(compare, pairs) if errs}
    assert len(pairs) > 200
    assert new == {}


def _part10(ds: Dataset, body: bytes, syntax: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.3")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4"
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)  # type: ignore[arg-type]
    return buf.getvalue() + body
