"""Builders shared by the de-identification tests (synthetic datasets, encoding)."""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import pydicom
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

from node.config import DeidSection
from node.deid.engine import Deidentifier
from tests.support import dicomgen

SITE = bytes(range(32))
OTHER_SITE = bytes(range(1, 33))


def engine(**options: object) -> Deidentifier:
    return Deidentifier(DeidSection(**options), SITE)  # type: ignore[arg-type]


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """*ds* as dataset bytes (no preamble, no File Meta) in *syntax*."""
    fp = DicomBytesIO()
    fp.is_little_endian = syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    data = fp.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = comp.compress(data) + comp.flush()
    return data


def read(data: bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(data))


def ct(study: dicomgen.FakeStudy | None = None, size: int = 8, index: int = 0) -> Dataset:
    """A small synthetic CT instance with identifying values."""
    study = study or dicomgen.FakeStudy()
    ds = dicomgen.ct_instance(study, generate_uid(), 1, index, size=size,
                              rng=np.random.default_rng(index))
    ds.OtherPatientIDs = "OTHERID77"
    ds.PatientAddress = "12 Harbour Street, Exampletown"
    ds.OperatorsName = "TECH^TERRY"
    ds.StationName = "CTSTATION9"
    ds.DeviceSerialNumber = "SN-445566"
    ds.StudyDescription = "CT CHEST DOE JANE FOLLOWUP"
    ds.InstitutionAddress = "1 Hospital Road"
    return ds
