"""Generate synthetic DICOM test data with pydicom (fake identities, synthetic pixels)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass
class FakePatient:
    name: str = "DOE^JANE^Q"
    patient_id: str = "MRN0012345"
    birth_date: str = "19640213"
    sex: str = "F"


@dataclass
class FakeStudy:
    patient: FakePatient = field(default_factory=FakePatient)
    study_uid: str = field(default_factory=generate_uid)
    accession: str = "ACC20260001"
    date: str = "20260311"
    time: str = "101522"
    description: str = "CT CHEST W/O CONTRAST"
    institution: str = "St. Example General Hospital"
    referring: str = "HOUSE^GREGORY"
    frame_uid: str = field(default_factory=generate_uid)


def base_dataset(study: FakeStudy, sop_class: str, modality: str, series_uid: str,
                 series_number: int, instance_number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.PatientBirthDate = study.patient.birth_date
    ds.PatientSex = study.patient.sex
    ds.StudyDate = study.date
    ds.StudyTime = study.time
    ds.SeriesDate = study.date
    ds.ContentDate = study.date
    ds.ContentTime = study.time
    ds.AccessionNumber = study.accession
    ds.StudyID = "1"
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = study.referring
    ds.InstitutionName = study.institution
    ds.Manufacturer = "FEDNODE-TEST"
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def ct_instance(study: FakeStudy, series_uid: str, series_number: int, index: int,
                size: int = 512, rng: np.random.Generator | None = None) -> Dataset:
    """A CT Image Storage instance, 16-bit, *size* x *size*."""
    rng = rng or np.random.default_rng(index)
    ds = base_dataset(study, CTImageStorage, "CT", series_uid, series_number, index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [0.0, 0.0, float(index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def dx_instance(study: FakeStudy, series_uid: str, index: int, size: int = 2048,
                rng: np.random.Generator | None = None) -> Dataset:
    """A Digital X-Ray (for presentation) instance, 16-bit, *size* x *size*."""
    rng = rng or np.random.default_rng(index)
    ds = base_dataset(study, DigitalXRayImageStorageForPresentation, "DX", series_uid, 1,
                      index + 1)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["P", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 14
    ds.HighBit = 13
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = rng.integers(0, 16384, (size, size), dtype=np.uint16).tobytes()
    return ds


def write(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write *ds* as a DICOM Part 10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_study(out: Path, *, series: int = 3, per_series: int = 4, size: int = 64,
                   study: FakeStudy | None = None) -> list[Path]:
    """A multi-series CT study as files under *out*; returns the paths."""
    study = study or FakeStudy()
    paths = []
    for s in range(series):
        series_uid = generate_uid()
        for i in range(per_series):
            ds = ct_instance(study, series_uid, s + 1, s * per_series + i, size=size)
            paths.append(write(ds, out / f"s{s}" / f"i{i}.dcm"))
    return paths


def today() -> str:
    return dt.date.today().strftime("%Y%m%d")
