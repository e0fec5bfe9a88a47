"""The de-identification engine on synthetic datasets (PS3.15 Annex E, Basic Profile + options)."""

from __future__ import annotations

import struct

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from node.deid.dates import offset_days, shift_da
from node.deid.engine import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MalformedDataset,
    split_part10,
)
from node.deid.pseudonyms import token, uid_pseudonym
from node.errors import RejectedInstance
from tests.support import dicomgen
from tests.support.deid_oracle import identifying_values, leaks
from tests.unit.deid_support import OTHER_SITE, SITE, ct, encode, engine, read

PHI_STRINGS = [
    b"DOE^JANE",
    b"MRN0012345",
    b"ACC20260001",
    b"OTHERID77",
    b"Harbour",
    b"HOUSE^GREGORY",
    b"Example General",
    b"TECH^TERRY",
    b"CTSTATION9",
    b"SN-445566",
    b"Hospital Road",
    b"19640213",
    b"20260311",
]


def test_basic_profile_output() -> None:
    ds = ct()
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    assert result.residue == ()
    out = read(result.data)

    patient = token(SITE, "patient-id", "MRN0012345")
    assert out.PatientID == "FN" + patient
    assert str(out.PatientName) == "FN" + patient + "^"
    assert out.PatientBirthDate == ""
    assert out.AccessionNumber == ""
    assert out.ReferringPhysicianName == ""
    assert "OtherPatientIDs" not in out and "PatientAddress" not in out
    assert "InstitutionAddress" not in out and "StudyDescription" not in out
    assert out.InstitutionName == "ANONYMIZED"  # X/Z/D, Type 1 in Enhanced General Equipment
    assert out.StationName == ""  # X/Z/D, at most Type 2
    # UIDs: keyed pseudonyms; classes kept
    assert out.SOPInstanceUID == uid_pseudonym(SITE, ds.SOPInstanceUID)
    assert out.StudyInstanceUID == uid_pseudonym(SITE, ds.StudyInstanceUID)
    assert out.FrameOfReferenceUID == uid_pseudonym(SITE, ds.FrameOfReferenceUID)
    assert out.SOPClassUID == CTImageStorage
    # dates shifted by the patient's offset, times kept
    days = offset_days(SITE, "MRN0012345", -3650, -365)
    assert out.StudyDate == shift_da(b"20260311", days).decode()
    assert out.StudyTime == ds.StudyTime
    # identity attributes (PS3.15 E.1.1 item 6, CID 7050)
    assert out.PatientIdentityRemoved == "YES"
    codes = [
        (i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence
    ]
    assert codes == [("113100", "DCM"), ("113107", "DCM")]
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "BurnedInAnnotation" not in out  # never claimed without knowing
    # new File Meta
    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert out.file_meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.PixelData == ds.PixelData
    for phi in PHI_STRINGS:
        assert phi not in result.data, phi


def test_result_keys_follow_the_receive_contract() -> None:
    ds = ct()
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    assert result.sop_key == uid_pseudonym(SITE, ds.SOPInstanceUID)
    assert result.study_key == uid_pseudonym(SITE, ds.StudyInstanceUID)
    assert result.series_key == uid_pseudonym(SITE, ds.SeriesInstanceUID)
    assert result.patient_key == token(SITE, "patient-id", "MRN0012345")
    assert result.accession_key == token(SITE, "accession", "ACC20260001")
    assert (result.modality, result.sop_class_uid) == ("CT", CTImageStorage)


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_transfer_syntaxes(syntax: str) -> None:
    ds = ct()
    ref = read(engine().deidentify(encode(ds), ExplicitVRLittleEndian).data)
    result = engine().deidentify(encode(ds, syntax), syntax)
    out = read(result.data)
    expected = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax
    assert out.file_meta.TransferSyntaxUID == expected
    for keyword in (
        "PatientID",
        "PatientName",
        "StudyDate",
        "SOPInstanceUID",
        "InstitutionName",
        "Rows",
        "PixelData",
        "DeidentificationMethodCodeSequence",
    ):
        assert out[keyword].value == ref[keyword].value, keyword
    assert result.residue == ()


def test_nested_references_map_consistently() -> None:
    ds = ct()
    ref_uid = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = ref_uid
    inner = Dataset()
    inner.PersonName = "NESTED^NAME"
    inner.ReferencedSOPInstanceUID = ref_uid
    inner.Date = "20260101"
    item.ContentSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item])
    ds.SourceImageSequence = Sequence([Dataset()])
    ds.SourceImageSequence[0].ReferencedSOPInstanceUID = ref_uid
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    mapped = uid_pseudonym(SITE, ref_uid)
    ref = out.ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == mapped
    assert ref.ReferencedSOPClassUID == CTImageStorage
    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == mapped
    nested = ref.ContentSequence[0]  # Content Sequence: D -> a dummy, recursively
    assert nested.ReferencedSOPInstanceUID == mapped
    assert str(nested.PersonName) == "ANONYMIZED"
    days = offset_days(SITE, "MRN0012345", -3650, -365)
    assert nested.Date == shift_da(b"20260101", days).decode()
    assert b"NESTED" not in result.data and ref_uid.encode() not in result.data


def _private(ds: Dataset) -> None:
    ds.add_new(0x00190010, "LO", "SIEMENS MR HEADER")
    ds.add_new(0x0019100C, "IS", "1000")  # B_value: Table E.3.10-1 safe
    ds.add_new(0x00191099, "LO", "DOE^JANE PRIVATE COPY")
    ds.add_new(0x00290010, "LO", "ACME PRIVATE")
    inner = Dataset()
    inner.PatientName = "DOE^JANE"
    ds.add_new(0x00291001, "SQ", Sequence([inner]))


def test_private_attributes_removed() -> None:
    ds = ct()
    _private(ds)
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    assert not any(elem.tag.is_private for elem in out)
    assert b"PRIVATE" not in result.data


def test_retain_safe_private_keeps_listed_ones_with_their_creator() -> None:
    ds = ct()
    _private(ds)
    result = engine(retain_safe_private=True).deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    private = {int(e.tag) for e in out if e.tag.is_private}
    assert private == {0x00190010, 0x0019100C}
    assert out[0x0019100C].value == 1000
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert "113111" in codes


def test_overlays_curves_icon_and_trailers_removed() -> None:
    ds = ct()
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", b"\x01" * 8)
    ds.add_new(0x60004000, "LT", "OVERLAY WITH DOE")
    ds.add_new(0x50000005, "US", 1)
    icon = Dataset()
    icon.Rows = icon.Columns = 1
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x00080000, "UL", 0)  # a group length
    result = engine(clean_graphics=True).deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    groups = {e.tag.group for e in out}
    assert not groups & {0x6000, 0x5000}
    assert "IconImageSequence" not in out
    assert 0x00080000 not in out


def test_free_text_is_cleaned_of_identifying_values() -> None:
    ds = ct()
    ds.WindowCenterWidthExplanation = "Doe Jane W1"  # not in Table E.1-1: cleaned
    ds.ConvolutionKernel = "Does-B30"  # 'Doe' inside a word is not a name
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    assert out.WindowCenterWidthExplanation == "*** *** W1"
    assert out.ConvolutionKernel == "Does-B30"


def test_clean_descriptors_keeps_descriptions_cleaned() -> None:
    ds = ct()
    result = engine(clean_descriptors=True).deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    assert out.StudyDescription == "CT CHEST *** *** FOLLOWUP"
    assert "113105" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}


def test_content_sequence_dummy_versus_clean_structured_content() -> None:
    ds = ct()
    item = Dataset()
    item.ValueType = "TEXT"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = (
        "121071",
        "DCM",
        "Finding",
    )
    item.ConceptNameCodeSequence = Sequence([concept])
    item.TextValue = "Jane Doe has a nodule"
    ds.ContentSequence = Sequence([item])
    basic = read(engine().deidentify(encode(ds), ExplicitVRLittleEndian).data)
    assert basic.ContentSequence[0].TextValue == "ANONYMIZED"
    assert basic.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    cleaned = read(
        engine(clean_structured_content=True).deidentify(encode(ds), ExplicitVRLittleEndian).data
    )
    assert cleaned.ContentSequence[0].TextValue == "*** *** has a nodule"


def test_options_keep_what_they_name() -> None:
    ds = ct()
    ds.PatientAge = "061Y"
    result = engine(
        retain_uids=True,
        longitudinal="full",
        retain_institution_identity=True,
        retain_patient_characteristics=True,
        retain_device_identity=True,
    ).deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    assert out.SOPInstanceUID == ds.SOPInstanceUID
    assert out.StudyDate == ds.StudyDate
    assert out.InstitutionName == ds.InstitutionName
    assert out.PatientSex == "F" and out.PatientAge == "061Y"
    assert out.DeviceSerialNumber == ds.DeviceSerialNumber
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    codes = {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113106", "113108", "113109", "113110", "113112"}
    # the keys of the node stay pseudonyms even when the output keeps the UIDs
    assert result.sop_key == uid_pseudonym(SITE, ds.SOPInstanceUID)
    assert result.residue == ()
    assert out.PatientID != ds.PatientID


def test_dates_removed_without_the_temporal_option() -> None:
    ds = ct()
    out = read(engine(longitudinal="off").deidentify(encode(ds), ExplicitVRLittleEndian).data)
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert out.StudyDate == "" and out.StudyTime == ""
    assert "ContentDate" in out and out.ContentDate == "19000101"  # Z/D, Type 1 somewhere


def test_deterministic_and_keyed() -> None:
    ds = ct()
    raw = encode(ds)
    first = engine().deidentify(raw, ExplicitVRLittleEndian).data
    again = engine().deidentify(raw, ExplicitVRLittleEndian).data
    assert first == again
    from node.config import DeidSection
    from node.deid.engine import Deidentifier

    other = read(
        Deidentifier(DeidSection(), OTHER_SITE).deidentify(raw, ExplicitVRLittleEndian).data
    )
    mine = read(first)
    assert other.StudyInstanceUID != mine.StudyInstanceUID
    assert other.PatientID != mine.PatientID


def test_two_studies_of_one_patient_keep_their_interval() -> None:
    patient = dicomgen.FakePatient()
    first = dicomgen.FakeStudy(patient=patient, date="20250102")
    second = dicomgen.FakeStudy(patient=patient, date="20260311")
    e = engine()
    a = read(e.deidentify(encode(ct(first)), ExplicitVRLittleEndian).data)
    b = read(e.deidentify(encode(ct(second)), ExplicitVRLittleEndian).data)
    import datetime as dt

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value, "%Y%m%d").date()

    assert a.PatientID == b.PatientID
    assert a.StudyDate != "20250102"
    assert day(b.StudyDate) - day(a.StudyDate) == dt.date(2026, 3, 11) - dt.date(2025, 1, 2)


def test_un_encoded_sequence_is_de_identified() -> None:
    """A public sequence sent as UN (PS3.5 6.2.2: implicit VR LE inside) is recursed into."""
    ds = ct()
    ref_uid = generate_uid()
    body = encode(ds)
    item = Dataset()
    item.ReferencedSOPInstanceUID = ref_uid
    item.PatientName = "UNSEQ^NAME"
    item_bytes = encode(item, ImplicitVRLittleEndian)
    seq = (
        struct.pack("<HH2sHL", 0x0008, 0x1140, b"UN", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, len(item_bytes))
        + item_bytes
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    )
    # insert the UN element in tag order (before (0008,2112) or the first larger tag)
    elems = _split_top(body)
    raw = (
        b"".join(b for t, b in elems if t < 0x00081140)
        + seq
        + b"".join(b for t, b in elems if t > 0x00081140)
    )
    result = engine().deidentify(raw, ExplicitVRLittleEndian)
    out = read(result.data)
    assert out["ReferencedImageSequence"].VR == "SQ"
    assert out.ReferencedImageSequence[0].ReferencedSOPInstanceUID == uid_pseudonym(SITE, ref_uid)
    assert b"UNSEQ" not in result.data and ref_uid.encode() not in result.data


def _split_top(body: bytes) -> list[tuple[int, bytes]]:
    from node.deid.engine import parse

    return [(el.tag, body[el.start : el.end]) for el in parse(body, ExplicitVRLittleEndian)]


def test_residue_check_catches_a_value_kept_elsewhere() -> None:
    ds = ct()
    ds.PatientName = "ROUTINE^X"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ROUTINE"]  # CS: kept as is
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    assert result.residue == ("PatientName",)


def test_oracle_agrees_no_identifying_value_left() -> None:
    ds = ct()
    e = engine()
    result = e.deidentify(encode(ds), ExplicitVRLittleEndian)
    assert leaks(result.data, identifying_values(ds, e.profile)) == {}


def test_patient_without_id_is_keyed_by_name_and_birth_date() -> None:
    ds = ct()
    ds.PatientID = ""
    result = engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    out = read(result.data)
    assert out.PatientID == ""
    assert result.patient_key == token(SITE, "patient-id", "name:DOE^JANE^Q|19640213")


def test_not_admitted() -> None:
    ds = ct()
    del ds.SOPInstanceUID
    with pytest.raises(RejectedInstance, match="no SOP Class UID or SOP Instance UID"):
        engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    ds = Dataset()
    ds.add_new(0x00041220, "SQ", Sequence([]))
    ds.SOPClassUID = "1.2.840.10008.1.3.10"
    with pytest.raises(RejectedInstance, match="DICOMDIR"):
        engine().deidentify(encode(ds), ExplicitVRLittleEndian)


def test_malformed_input() -> None:
    raw = encode(ct())
    with pytest.raises(MalformedDataset, match="runs past the end"):
        engine().deidentify(raw[:-5], ExplicitVRLittleEndian, repair=False)
    with pytest.raises(MalformedDataset):
        engine().deidentify(b"\x08\x00\x05\x00XX\x02\x00ab", ExplicitVRLittleEndian, repair=False)


def test_repair_reads_a_truncated_dataset_leniently() -> None:
    ds = ct()
    del ds.PixelData
    ds.ImageComments = "a comment long enough to be cut short"
    raw = encode(ds)
    result = engine().deidentify(raw[:-5], ExplicitVRLittleEndian)  # truncated last element
    assert read(result.data).PatientID.startswith("FN")
    assert result.residue == ()


def test_truncated_pixel_data_is_rejected_with_the_sizes() -> None:
    """A truncated file read leniently would be written with pixels that no longer decode."""
    ds = ct()
    needed = len(ds.PixelData)
    raw = encode(ds)
    with pytest.raises(RejectedInstance, match=rf"holds {needed - 4} bytes.*needs {needed}"):
        engine().deidentify(raw[:-5], ExplicitVRLittleEndian)
    ds.NumberOfFrames = 2  # the module now says two frames; the value holds one
    with pytest.raises(RejectedInstance, match="x 2 frame"):
        engine().deidentify(encode(ds), ExplicitVRLittleEndian)
    ds.NumberOfFrames = 1
    ds.PixelData = ds.PixelData + b"\0\0"  # padding beyond the module's size is accepted
    assert engine().deidentify(encode(ds), ExplicitVRLittleEndian).residue == ()


def test_split_part10_and_file_entry_point(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ds = ct()
    path = dicomgen.write(ds, tmp_path / "a.dcm", ImplicitVRLittleEndian)
    data = path.read_bytes()
    body, syntax = split_part10(data)
    assert syntax == ImplicitVRLittleEndian and body == encode(ds, ImplicitVRLittleEndian)
    e = engine()
    assert e.deidentify_file(data).data == e.deidentify(body, syntax).data
    assert split_part10(body) == (body, ImplicitVRLittleEndian)
