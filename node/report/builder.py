"""Build a task's result as a DICOM TID 1500 Imaging Measurement Report (highdicom).

The document (PS3.16 TID 1500 "Measurement Report") holds, for one version of a study and one
task:

* Observation context (TID 1001/1002/1004): the node as the observer **device** (Device
  Observer UID, name = the node's AE title, manufacturer and model "fednode");
* Procedure Reported: the task's imaging procedure;
* Image Library (TID 1600): the images the task read, by their **original** SOP Instance UIDs;
* one Measurement Group (TID 1501) with the task's finding as Finding (row 121071), a
  qualitative evaluation of the finding (Present/Absent per the task's threshold,
  :meth:`plugins.base.TaskPlugin.decide`), the probability as a unitless measurement (TID 300,
  UCUM ``1``), and Algorithm Identification (TID 4019): the task name and version, the model
  id and version, the decision threshold and that the inference ran under CKKS homomorphic
  encryption.

The SR is Comprehensive 3D SR by default; Enhanced SR is selectable (``[export] sr_format``)
for a PACS that does not store Comprehensive 3D SR; the content fits both. It is always
PARTIAL (Completion Flag), UNVERIFIED (Verification Flag) and PRELIMINARY (Preliminary Flag):
no person has reviewed it. A report of a newer version of the study lists the SR it replaces in
the Predecessor Documents Sequence.

The patient and study come from the vault's original header, never from the de-identified
instance: highdicom copies the Patient and General Study modules from the first evidence
dataset, so :func:`evidence_image` builds every evidence dataset from the vault's study record
plus the instance's original UIDs, and takes only geometry (rows, columns, pixel spacing,
orientation) from the de-identified header. No pseudonym of the node is copied into the SR.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from node.errors import NodeError
from node.report import codes
from plugins.base import CodedConcept

if TYPE_CHECKING:
    from highdicom.sr import CodedConcept as HdCodedConcept

SERIES_NUMBER = 9001
"""Series Number of the node's SR series (high, so that PACS viewers list it after the images)."""

MANUFACTURER = "fednode"

# Type 2 attributes highdicom reads from the first evidence dataset (they may be absent in the
# original header; they are then present and empty in the SR, as PS3.3 allows).
_TYPE2_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

# Image geometry copied from the de-identified header into the Image Library descriptors
# (TID 1602-1604). None of these identifies a person; UIDs (Frame of Reference) are pseudonyms
# in the de-identified header and are never copied.
_PROJECTION = ("PatientOrientation", "ImagerPixelSpacing")
_CROSS_SECTIONAL = ("PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient",
                    "SliceThickness")
_GEOMETRY = ("Rows", "Columns", *_PROJECTION, *_CROSS_SECTIONAL, "SpacingBetweenSlices")
_PROJECTION_MODALITIES = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})
_CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT"})


class ReportError(NodeError):
    """The Structured Report could not be built (the message holds no PHI)."""


@dataclass(frozen=True)
class ReportFinding:
    """What one task concluded about one version of a study."""

    task: str
    task_version: str
    finding: CodedConcept
    """What the task assesses (:attr:`plugins.base.TaskPlugin.finding`)."""
    evaluation: CodedConcept
    """The reported class's concept (for a binary finding: Present or Absent)."""
    probability: float
    threshold: float
    model_id: str
    model_version: str | None = None
    encryption: str = "CKKS"
    """The homomorphic encryption scheme the inference ran under."""
    encryption_parameters: str = ""
    """For example ``"poly_modulus_degree=8192, scale=2^26"`` (no key material)."""


@dataclass(frozen=True)
class ReportIdentity:
    """The SR's own identity: its UIDs and numbers, and the observer device (the node)."""

    sop_instance_uid: str
    series_instance_uid: str
    instance_number: int
    device_uid: str
    device_name: str
    software_version: str
    series_number: int = SERIES_NUMBER
    sr_format: str = "comprehensive-3d"


@dataclass(frozen=True)
class DocumentReference:
    """An earlier SR of the same study and task (Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


def report_uid(key: bytes, *parts: str) -> str:
    """A deterministic UID ``2.25.<128-bit int>`` from an HMAC of *parts* under *key*.

    The node derives its SR's Study-independent UIDs (series, instance, tracking, device) this
    way so that a re-run of the report job produces the same SOP Instance UID (the PACS sees a
    re-send, not a second report). The input is domain-separated (``fednode-sr``) from the
    de-identification pseudonyms, so no UID of the SR equals a pseudonym of the node.
    """
    message = "\x00".join(("fednode-sr", *parts)).encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def series_description(task: str, task_version: str) -> str:
    """A Series Description (LO, 64 characters) that says what the series is."""
    text = f"AI result {task} {task_version} - preliminary, not verified"
    return text[:64]


def evidence_image(study: Dataset, original: Dataset, deid_header: Dataset | None) -> Dataset:
    """One evidence dataset: the vault's original patient/study and instance UIDs + geometry.

    Parameters
    ----------
    study : Dataset
        The vault's original Patient and General Study attributes (:func:`node.deid.vault.
        load_study`).
    original : Dataset
        The vault's original SOP Class, SOP Instance, Study and Series Instance UIDs of the
        instance (:func:`node.deid.vault.load_instances`).
    deid_header : Dataset or None
        The de-identified header of the instance; only Modality and the geometry attributes
        are read from it.
    """
    ds = copy.deepcopy(study)
    for keyword in _TYPE2_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in original or not str(original[keyword].value):
            raise ReportError(f"a vault instance record has no {keyword}")
        setattr(ds, keyword, str(original[keyword].value))
    if "StudyInstanceUID" in study and str(study.StudyInstanceUID) != str(ds.StudyInstanceUID):
        raise ReportError("a vault instance record belongs to another study")
    if deid_header is not None:
        for keyword in ("Modality", *_GEOMETRY):
            if keyword in deid_header and deid_header[keyword].value not in (None, ""):
                setattr(ds, keyword, deid_header[keyword].value)
    return ds


def _library_entry(image: Dataset) -> Dataset | None:
    """The dataset highdicom's Image Library reads for *image*, or ``None`` if it cannot.

    TID 1601 needs Rows and Columns; the modality-specific descriptors (TID 1603 projection,
    TID 1604 cross-sectional) are given when the header has their attributes, else the entry
    carries the common descriptors only.
    """
    if "Rows" not in image or "Columns" not in image:
        return None
    entry = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", *_GEOMETRY):
        if keyword in image:
            setattr(entry, keyword, image[keyword].value)
    modality = str(image.get("Modality", "") or "")
    needs = (
        _PROJECTION
        if modality in _PROJECTION_MODALITIES
        else _CROSS_SECTIONAL
        if modality in _CROSS_SECTIONAL_MODALITIES
        else ()
    )
    complete = all(k in entry for k in needs) and (
        modality not in _PROJECTION_MODALITIES or len(entry.PatientOrientation) == 2
    )
    # highdicom picks the descriptor set by Modality; without the attributes it needs, the
    # entry is written with the common descriptors only (Modality, from the SOP class, is
    # still coded in the entry).
    entry.Modality = modality if complete else "OT"
    return entry


def warm_up() -> None:
    """Import highdicom and load its IOD tables (about 1.5 s, once per process).

    The first SR a process builds otherwise pays for it; the report stage calls this when its
    worker starts, before a result is waiting. Uses an invented image header, no PHI.
    """
    from highdicom.sr import ImageLibraryEntryDescriptors

    _quiet_highdicom()
    image = Dataset()
    image.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    image.SOPInstanceUID = "2.25.1"
    image.Modality = "OT"
    image.Rows = image.Columns = 1
    ImageLibraryEntryDescriptors(image)


def _quiet_highdicom() -> None:
    """Silence highdicom's logger: it logs the evidence's SOP Instance UIDs (here: original,
    identifying UIDs) at INFO level. Problems still surface as exceptions."""
    logging.getLogger("highdicom").setLevel(logging.CRITICAL + 1)


def _concept(concept: CodedConcept) -> HdCodedConcept:
    from highdicom.sr import CodedConcept as HdConcept

    return HdConcept(
        value=concept.value, scheme_designator=concept.scheme_designator, meaning=concept.meaning
    )


def build_report(
    study: Dataset,
    images: Sequence[Dataset],
    finding: ReportFinding,
    identity: ReportIdentity,
    *,
    predecessors: Sequence[DocumentReference] = (),
    procedure: CodedConcept = codes.IMAGING_PROCEDURE,
) -> Dataset:
    """The TID 1500 SR of one result (see the module docstring).

    Parameters
    ----------
    study : Dataset
        The vault's original Patient and General Study attributes.
    images : sequence of Dataset
        Evidence datasets from :func:`evidence_image`, one per image the task read.
    finding : ReportFinding
        The result.
    identity : ReportIdentity
        The SR's UIDs, numbers, format and observer device.
    predecessors : sequence of DocumentReference
        Earlier SRs this one replaces (Predecessor Documents Sequence).

    Returns
    -------
    pydicom.dataset.Dataset
        The SR (a highdicom SR object) with its file meta information.

    Raises
    ------
    ReportError
        If the inputs cannot make a valid SR (no images, an unknown format ...).
    """
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        EnhancedSR,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes as dcm_codes

    _quiet_highdicom()
    if not images:
        raise ReportError("a report needs at least one evidence image")
    sr_class: Any
    if identity.sr_format == "comprehensive-3d":
        sr_class = Comprehensive3DSR
    elif identity.sr_format == "enhanced":
        sr_class = EnhancedSR
    else:
        raise ReportError(f"unknown SR format {identity.sr_format!r}")
    if not 0.0 <= finding.probability <= 1.0:
        raise ReportError("the probability is outside [0, 1]")

    algorithm = AlgorithmIdentification(
        name=finding.task,
        version=finding.task_version,
        family=_concept(codes.ARTIFICIAL_INTELLIGENCE),
        manufacturer=MANUFACTURER,
        parameters=[
            f"model_id={finding.model_id}",
            *([f"model_version={finding.model_version}"] if finding.model_version else []),
            f"decision_threshold={finding.threshold:g}",
            (
                f"inference under {finding.encryption} homomorphic encryption"
                + (f" ({finding.encryption_parameters})" if finding.encryption_parameters else "")
                + ": the model owner evaluated the model on ciphertext and never saw the "
                "image or the result"
            ),
        ],
    )
    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.device_name,
            manufacturer_name=MANUFACTURER,
            model_name=MANUFACTURER,
        ),
    )
    entries = [e for e in (_library_entry(img) for img in images) if e is not None]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=report_uid(identity.device_uid.encode(), "tracking", identity.sop_instance_uid),
            identifier=f"{finding.task} {finding.task_version} result",
        ),
        finding_type=_concept(finding.finding),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            QualitativeEvaluation(
                name=_concept(finding.finding), value=_concept(finding.evaluation)
            )
        ],
        measurements=[
            Measurement(
                name=_concept(codes.PROBABILITY),
                value=round(float(finding.probability), 6),
                unit=_concept(codes.NO_UNITS),
            )
        ],
        source_images=[
            SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(img.SOPClassUID),
                referenced_sop_instance_uid=str(img.SOPInstanceUID),
            )
            for img in images
        ],
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_concept(procedure),
        imaging_measurements=[group],
        referenced_images=entries or None,
    )
    previous: list[Dataset] = []
    for ref in predecessors:
        pre = Dataset()
        pre.StudyInstanceUID = ref.study_instance_uid
        pre.SeriesInstanceUID = ref.series_instance_uid
        pre.SOPInstanceUID = ref.sop_instance_uid
        pre.SOPClassUID = ref.sop_class_uid
        previous.append(pre)
    try:
        sr = sr_class(
            evidence=list(images),
            content=report[0],
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=identity.instance_number,
            manufacturer=MANUFACTURER,
            is_complete=False,
            is_final=False,
            is_verified=False,
            previous_versions=previous or None,
            series_description=series_description(finding.task, finding.task_version),
            manufacturer_model_name=MANUFACTURER,
            software_versions=identity.software_version,
            institution_name=None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"highdicom refused the report: {type(exc).__name__}") from exc
    return sr  # type: ignore[no-any-return]


def encode_report(sr: Dataset) -> bytes:
    """The SR as DICOM Part 10 bytes (Explicit VR Little Endian, as highdicom wrote it)."""
    buf = io.BytesIO()
    dcmwrite(buf, sr, enforce_file_format=True)
    return buf.getvalue()
