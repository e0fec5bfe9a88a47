"""Burned-in annotation: the admission gate and the pixel rules (PS3.15 E.1.1 note 5, E.3.1)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from node.config import DeidSection, PixelRule
from node.deid.engine import Deidentifier
from node.deid.pixels import Header, assess, match_rule
from node.errors import RejectedInstance
from tests.support import dicomgen
from tests.unit.deid_support import SITE, encode, read

RECT = (4, 2, 10, 5)  # x, y, w, h
US_RULE = PixelRule(
    name="acme-sono", manufacturer="acme", model="SONO-1", rows=32, columns=48, rectangles=[RECT]
)


def us_multiframe(bia: str | None = "YES", frames: int = 3) -> Dataset:
    study = dicomgen.FakeStudy()
    ds = dicomgen.base_dataset(study, UltrasoundMultiFrameImageStorage, "US", generate_uid(), 1, 1)
    ds.Manufacturer = "ACME"
    ds.ManufacturerModelName = "SONO-1"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.0
    ds.FrameIncrementPointer = 0x00181063
    ds.Rows, ds.Columns = 32, 48
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if bia is not None:
        ds.BurnedInAnnotation = bia
    rng = np.random.default_rng(3)
    ds.PixelData = rng.integers(1, 255, (frames, 32, 48, 3), dtype=np.uint8).tobytes()
    return ds


def deid(
    ds_or_bytes: Dataset | bytes, rules: list[PixelRule], syntax: str = ExplicitVRLittleEndian
):  # type: ignore[no-untyped-def]
    engine = Deidentifier(DeidSection(pixel_rules=rules), SITE)
    raw = ds_or_bytes if isinstance(ds_or_bytes, bytes) else encode(ds_or_bytes, syntax)
    return engine.deidentify(raw, syntax)


def _inside(arr: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = rect
    return arr[..., y : y + h, x : x + w, :] if arr.ndim == 4 else arr[..., y : y + h, x : x + w]


def test_burned_in_ultrasound_is_rejected_without_a_rule() -> None:
    with pytest.raises(RejectedInstance, match=r"Burned In Annotation is YES.*no pixel rule"):
        deid(us_multiframe(), [])
    other = PixelRule(manufacturer="ACME", model="OTHER", rectangles=[RECT])
    with pytest.raises(RejectedInstance, match="model 'SONO-1', 32x48"):
        deid(us_multiframe(), [other])


def test_burned_in_ultrasound_is_cleaned_in_every_frame_with_a_rule() -> None:
    ds = us_multiframe()
    result = deid(ds, [US_RULE])
    assert result.pixels_cleaned and result.pixel_rule == "acme-sono"
    out = read(result.data)
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    before = np.frombuffer(ds.PixelData, np.uint8).reshape(3, 32, 48, 3)
    after = out.pixel_array
    assert after.shape == (3, 32, 48, 3)
    for frame in range(3):
        assert not _inside(after[frame], RECT).any()
    mask = np.ones(after.shape, dtype=bool)
    mask[:, 2:7, 4:14, :] = False
    assert np.array_equal(after[mask], before[mask])
    assert result.residue == ()


def test_absent_burned_in_annotation_on_ultrasound_is_gated() -> None:
    with pytest.raises(
        RejectedInstance,
        match="absent and the SOP class is Ultrasound Multi-frame Image",
    ):
        deid(us_multiframe(bia=None), [])
    result = deid(us_multiframe(bia=None), [US_RULE])
    assert read(result.data).BurnedInAnnotation == "NO"


def test_declared_clean_instance_is_admitted_untouched() -> None:
    ds = us_multiframe(bia="NO")
    result = deid(ds, [])
    out = read(result.data)
    assert not result.pixels_cleaned
    assert out.BurnedInAnnotation == "NO" and out.PixelData == ds.PixelData


def test_implicit_vr_stays_implicit_when_cleaned() -> None:
    ds = us_multiframe()
    result = deid(ds, [US_RULE], ImplicitVRLittleEndian)
    out = read(result.data)
    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert not _inside(out.pixel_array[1], RECT).any()


def test_document_without_pixels_cannot_be_cleaned() -> None:
    ds = dicomgen.base_dataset(
        dicomgen.FakeStudy(), EncapsulatedPDFStorage, "DOC", generate_uid(), 1, 1
    )
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 Jane Doe"
    with pytest.raises(RejectedInstance, match="no pixel rule can clean"):
        deid(ds, [PixelRule(rectangles=[(0, 0, 1, 1)])])


def _testfile(name: str, bia: str | None = None) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
    if bia is not None:
        ds.BurnedInAnnotation = bia
        import io

        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()
    return Path(path).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_rle_2frame.dcm",  # RLE, RGB, 2 frames
        "SC_rgb_rle_16bit_2frame.dcm",  # RLE, 16-bit RGB
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG baseline, YBR_FULL_422
        "SC_rgb_small_odd_jpeg.dcm",  # odd size
        "US1_J2KR.dcm",  # JPEG 2000 lossless ultrasound
        "color-pl.dcm",  # uncompressed, planar configuration 1
        "SC_ybr_full_422_uncompressed.dcm",  # uncompressed YBR_FULL_422
        "MR_small_RLE.dcm",  # monochrome RLE, gated by Burned In Annotation YES
        "JPEG2000.dcm",  # J2K monochrome secondary capture
    ],
)
def test_compressed_and_odd_layouts_are_cleaned(name: str) -> None:
    data = _testfile(name, bia="YES")
    engine = Deidentifier(DeidSection(pixel_rules=[PixelRule(rectangles=[(1, 1, 2, 2)])]), SITE)
    result = engine.deidentify_file(data)
    out = read(result.data)
    assert not out.file_meta.TransferSyntaxUID.is_compressed
    assert out.BurnedInAnnotation == "NO"
    pixels = out.pixel_array
    frames = int(out.get("NumberOfFrames", 1) or 1)
    frames_arr = pixels if frames > 1 else pixels[None]
    # (YBR is shown as RGB by pydicom: black Y 0, Cb Cr 128 is RGB 0 0 0)
    for frame in frames_arr:
        assert not frame[1:3, 1:3].any(), name
    if out.Rows > 4 and out.Columns > 4:
        assert frames_arr[:, 4:, 4:].any()
    assert result.residue == ()


def test_rule_matching() -> None:
    header = Header(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.6.1",
        modality="US",
        burned_in="YES",
        manufacturer="  Acme ",
        model="SONO-1",
        rows=32,
        columns=48,
        has_pixels=True,
    )
    assert match_rule([US_RULE], header) is US_RULE
    assert match_rule([PixelRule(rows=31, rectangles=[RECT])], header) is None
    assert match_rule([PixelRule(modality="us", rectangles=[RECT])], header) is not None
    ct = Header(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        modality="CT",
        burned_in=None,
        manufacturer="",
        model="",
        rows=8,
        columns=8,
        has_pixels=True,
    )
    decision = assess(ct, DeidSection())
    assert decision.rule is None and decision.burned_in_out is None
    sc = Header(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        modality="CT",
        burned_in=None,
        manufacturer="",
        model="",
        rows=8,
        columns=8,
        has_pixels=True,
    )
    with pytest.raises(RejectedInstance):  # secondary capture SOP class: gated whatever modality
        assess(sc, DeidSection())
