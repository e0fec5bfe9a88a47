"""The TID 1500 SR builder: valid IODs (dciodvfy), highdicom round trip, the right content."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import highdicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.deid.engine import VAULT_STUDY_TAGS
from node.report import codes
from node.report.builder import (
    DocumentReference,
    ReportError,
    ReportFinding,
    ReportIdentity,
    build_report,
    encode_report,
    evidence_image,
    report_uid,
)
from plugins.chest_xray.task import ChestXrayTask
from tests.support.reports import dciodvfy_errors

KEY = b"k" * 32
TASK = ChestXrayTask()


def _study() -> tuple[Dataset, list[Dataset]]:
    synthetic = next(iter(TASK.synthetic_studies(1, seed=7, image_size=64)))
    image = synthetic.datasets[0]
    study = Dataset()
    for elem in image:
        if elem.tag in VAULT_STUDY_TAGS:
            study.add(elem)
    return study, list(synthetic.datasets)


def _original_uids(ds: Dataset) -> Dataset:
    out = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(out, keyword, ds[keyword].value)
    return out


def _deidentified(ds: Dataset) -> Dataset:
    """A header whose UIDs are pseudonyms (as the node's de-identified copy has)."""
    out = copy.deepcopy(ds)
    del out.PixelData
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(out, keyword, report_uid(b"p" * 32, "pseudonym", str(ds[keyword].value)))
    out.PatientName = "FN^PSEUDONYM"
    out.PatientID = "FNPSEUDONYM"
    return out


def _finding(probability: float) -> ReportFinding:
    decided = TASK.decide(probability)
    threshold = TASK.positive_class.threshold
    assert threshold is not None
    return ReportFinding(
        task=TASK.name,
        task_version=TASK.version,
        finding=TASK.finding,
        evaluation=decided.concept,
        probability=probability,
        threshold=threshold,
        model_id="chest-model-7",
        model_version="3",
        encryption_parameters="poly_modulus_degree=8192, scale=2^26",
    )


def _identity(fmt: str, number: int = 1) -> ReportIdentity:
    return ReportIdentity(
        sop_instance_uid=report_uid(KEY, "instance", str(number)),
        series_instance_uid=report_uid(KEY, "series"),
        instance_number=number,
        device_uid=report_uid(KEY, "device"),
        device_name="FEDNODE",
        software_version="0.1.0",
        sr_format=fmt,
    )


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
@pytest.mark.parametrize("fmt", ["comprehensive-3d", "enhanced"])
@pytest.mark.parametrize("probability", [0.83, 0.12])
def test_sr_validates_and_round_trips(tmp_path: Path, fmt: str, probability: float) -> None:
    study, images = _study()
    evidence = [evidence_image(study, _original_uids(ds), _deidentified(ds)) for ds in images]
    previous = DocumentReference(
        study_instance_uid=str(study.StudyInstanceUID),
        series_instance_uid=report_uid(KEY, "series"),
        sop_instance_uid=report_uid(KEY, "instance", "1"),
        sop_class_uid=codes.SR_FORMATS[fmt],
    )
    sr = build_report(
        study, evidence, _finding(probability), _identity(fmt, 2), predecessors=[previous]
    )
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode_report(sr))
    assert dciodvfy_errors(path) == []

    back = highdicom.sr.srread(path)
    assert str(back.SOPClassUID) == codes.SR_FORMATS[fmt]
    # The original patient and study, from the vault's header (never the pseudonyms).
    original = images[0]
    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID",
                    "StudyDate", "PatientBirthDate"):
        assert str(back[keyword].value) == str(original[keyword].value), keyword
    assert back.CompletionFlag == "PARTIAL"
    assert back.VerificationFlag == "UNVERIFIED"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "preliminary" in back.SeriesDescription and TASK.name in back.SeriesDescription
    assert back.InstanceNumber == 2
    # Evidence and the image library name the original SOP Instance UIDs.
    assert {uid for _, _, uid, _ in back.get_evidence()} == {
        str(ds.SOPInstanceUID) for ds in images
    }
    pre = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pre.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == previous.sop_instance_uid
    # The finding, its evaluation per the threshold and the probability.
    group = back.content.get_image_measurement_groups()[0]
    assert group.finding_type.value == TASK.finding.value
    evaluation = group.get_qualitative_evaluations(
        name=highdicom.sr.CodedConcept(
            TASK.finding.value, TASK.finding.scheme_designator, TASK.finding.meaning
        )
    )
    expected = "52101004" if probability >= 0.5 else "272519000"  # Present / Absent
    assert [e.value.value for e in evaluation] == [expected]
    (measurement,) = group.get_measurements()
    assert measurement.value == pytest.approx(probability)
    assert measurement.unit.value == "1"
    # Algorithm identification: task, version, model, CKKS.
    text = path.read_bytes()
    for needle in (b"chest_xray", b"model_id=chest-model-7", b"model_version=3", b"CKKS"):
        assert needle in text
    observer = back.content.get_observer_contexts()[0]
    assert observer.observer_type.value == "121007"  # Device
    # Nothing of the de-identified header's pseudonyms.
    for ds in images:
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            pseudonym = report_uid(b"p" * 32, "pseudonym", str(ds[keyword].value))
            assert pseudonym.encode() not in text
    assert b"PSEUDONYM" not in text


def test_missing_type2_attributes_are_present_and_empty(tmp_path: Path) -> None:
    study, images = _study()
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName"):
        if keyword in study:
            delattr(study, keyword)
    evidence = [evidence_image(study, _original_uids(ds), None) for ds in images]
    sr = build_report(study, evidence, _finding(0.6), _identity("comprehensive-3d"))
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode_report(sr))
    ds = dcmread(path)
    assert ds.PatientBirthDate == "" and ds.StudyID == ""
    if shutil.which("dciodvfy"):
        assert dciodvfy_errors(path) == []


def test_bad_inputs_are_refused_without_phi() -> None:
    study, images = _study()
    with pytest.raises(ReportError, match="at least one"):
        build_report(study, [], _finding(0.5), _identity("comprehensive-3d"))
    evidence = [evidence_image(study, _original_uids(ds), None) for ds in images]
    with pytest.raises(ReportError, match="unknown SR format"):
        build_report(study, evidence, _finding(0.5), _identity("basic"))
    other = _original_uids(images[0])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ReportError, match="another study") as info:
        evidence_image(study, other, None)
    assert str(study.PatientID) not in str(info.value)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_the_validator_catches_a_broken_sr(tmp_path: Path) -> None:
    study, images = _study()
    evidence = [evidence_image(study, _original_uids(ds), None) for ds in images]
    sr = build_report(study, evidence, _finding(0.6), _identity("comprehensive-3d"))
    del sr.CompletionFlag
    path = tmp_path / "broken.dcm"
    path.write_bytes(encode_report(sr))
    assert any("CompletionFlag" in line for line in dciodvfy_errors(path))


def test_building_logs_no_original_uid(caplog: pytest.LogCaptureFixture) -> None:
    study, images = _study()
    evidence = [evidence_image(study, _original_uids(ds), None) for ds in images]
    with caplog.at_level(logging.DEBUG):
        build_report(study, evidence, _finding(0.6), _identity("comprehensive-3d"))
    for ds in images:
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            assert str(ds[keyword].value) not in caplog.text
    assert str(study.PatientID) not in caplog.text
