"""The de-identification engine: DICOM PS3.15 Annex E applied to encoded bytes.

The engine never builds a pydicom dataset on its hot path. It walks the encoded dataset
(:mod:`node.dicom.encoding`: PS3.5 Section 7 tag, VR, length; sequences item by item, defined or
undefined length, UN-encoded sequences as Implicit VR Little Endian), decides per element by
tag and VR, and
writes the output from slices of the input: an element that is kept is copied as encoded, never
decoded. Only the elements a rule names are read and rewritten (UIDs, dates, names, text that
must be cleaned), which makes the engine several times faster than a read-modify-write through
pydicom.

Rules, in order (PS3.15 E.1.1, E.2, E.3):

1. Table E.1-1, as resolved for the active options by :mod:`node.deid.profile`, wherever the
   attribute occurs: at the top level and recursively in every sequence item, private and
   UN-encoded sequences included. Patient ID and Patient's Name become a keyed token
   (:func:`node.deid.pseudonyms.token`) with the configured prefix.
2. Overlays (60xx), curves (50xx), group lengths, Data Set Trailing Padding and the Icon Image
   Sequence are removed.
3. Private attributes are removed, unless the Retain Safe Private Option is on and the
   (private creator, element) pair is in the configured safe list (E.3.10); their creator
   elements are kept with them.
4. Standard attributes the table does not name: kept if they cannot identify (numbers, code
   strings, binary values) or are known-safe coded text (:data:`SAFE_TEXT_KEYWORDS`); by VR
   otherwise: UIDs are replaced, every DA and DT is shifted (or kept or emptied, following the
   temporal option), TM kept (see :mod:`node.deid.dates`), PN emptied, other text cleaned of
   every identifying value of the instance (inside a sequence the table says to replace with a
   dummy, ``D``, such text is replaced by a dummy instead). Unknown public tags whose VR cannot
   be known (``UN``) are removed.
5. UIDs become ``2.25.<int>`` keyed pseudonyms (:func:`node.deid.pseudonyms.uid_pseudonym`),
   except UIDs registered by the standard (``1.2.840.10008.*``) and the attributes that name
   a class rather than an instance (SOP Class, Transfer Syntax, coding schemes ...). The same
   UID maps to the same pseudonym in every attribute, so references stay consistent.
6. The identity attributes are set: Patient Identity Removed (0012,0062) ``YES``,
   De-identification Method (0012,0063), De-identification Method Code Sequence (0012,0064)
   with 113100 and one code per active option (CID 7050), Longitudinal Temporal Information
   Modified (0028,0303), Burned In Annotation (0028,0301) ``NO`` where pixels were cleaned or
   the sender declared ``NO``; and a new File Meta Information (PS3.10, E.1.1 item 7) names
   fednode's implementation.

"Cleaning" text (action ``C`` on a text VR, and rule 4) removes every occurrence of the
instance's identifying values (names and name components, IDs, dates, addresses ...), matched
case-insensitively on word boundaries. The same values drive the residue check: after writing,
no identifying value of the input may appear anywhere in the output header (the pixel data is
the business of the burned-in gate, :mod:`node.deid.pixels`).
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from pydicom._dicom_dict import DicomDictionary
from pydicom.datadict import keyword_for_tag

from node import __version__
from node.config import DeidSection
from node.deid import pixels
from node.deid.dates import offset_days, shift_values
from node.deid.profile import (
    BASIC_PROFILE_CODE,
    OPTION_CODES,
    Action,
    Code,
    Option,
    Profile,
    build_profile,
)
from node.deid.pseudonyms import token, uid_pseudonym
from node.dicom.encoding import (
    DEFLATED_LE,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    LONG_VRS,
    Element,
    MalformedDataset,
    dictionary_vr,
    inflate,
    normalize,
    parse,
    split_part10,
    wrap,
)
from node.errors import RejectedInstance

logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_UID_TAGS",
    "DUMMY_TEXT",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "DeidResult",
    "Deidentifier",
    "MalformedDataset",
    "normalize",
    "options_from_config",
    "parse",
    "split_part10",
]

IMPLEMENTATION_CLASS_UID: Final = "2.25.199237957695002345476888116118329248292"
"""fednode's Implementation Class UID (PS3.7 D.3.3.2), a fixed UUID-derived UID."""
IMPLEMENTATION_VERSION_NAME: Final = f"FEDNODE_{__version__}"[:16]

_NATIVE = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED_LE, EXPLICIT_BE})

DUMMY_TEXT: Final = b"ANONYMIZED"
"""The dummy value (action D) of the text VRs; fits SH (16) and CS (16)."""
_REGISTERED_ROOT = "1.2.840.10008."
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Samples per Pixel, Photometric Interpretation, Number of Frames, Bits Allocated: with Rows
# and Columns, the size of native Pixel Data (PS3.5 8.1.1, PS3.3 C.7.6.3).
_PIXEL_SIZE_TAGS = frozenset({0x00280002, 0x00280004, 0x00280008, 0x00280100})

_TEXT_VRS = frozenset({"AE", "LO", "LT", "SH", "ST", "UC", "UT", "UR"})

# Standard attributes that name a class or a scheme, not an instance: never replaced.
CLASS_UID_TAGS: frozenset[int] = frozenset(
    {
        0x00020002,  # Media Storage SOP Class UID
        0x00020010,  # Transfer Syntax UID
        0x00020012,  # Implementation Class UID
        0x00041510,  # Referenced SOP Class UID in File
        0x00041512,  # Referenced Transfer Syntax UID in File
        0x00080016,  # SOP Class UID
        0x0008001A,  # Related General SOP Class UID
        0x0008001B,  # Original Specialized SOP Class UID
        0x00080062,  # SOP Classes in Study
        0x0008010C,  # Coding Scheme UID
        0x0008010D,  # Context Group Extension Creator UID
        0x00080118,  # Mapping Resource UID
        0x00081150,  # Referenced SOP Class UID
        0x04000510,  # Encrypted Content Transfer Syntax UID
    }
)

# Text attributes the table does not name that hold coded or technical values, never free
# text about a person: kept even inside a dummy (D) sequence (still cleaned of identifiers).
SAFE_TEXT_KEYWORDS: frozenset[str] = frozenset(
    """CodeValue CodingSchemeDesignator CodingSchemeVersion CodeMeaning LongCodeValue
    URNCodeValue ContextIdentifier ContextGroupExtensionFlag MappingResource
    MappingResourceName CodingSchemeName CodingSchemeResponsibleOrganization Manufacturer
    ManufacturerModelName SoftwareVersions WindowCenterWidthExplanation ConvolutionKernel
    FilterType ReceiveCoilName TransmitCoilName SequenceName PositionReferenceIndicator
    RescaleType LUTExplanation TextFormatOfTheValue SelectorAttributePrivateCreator
    PrivateCreatorReference ImplementationVersionName""".split()
)

_PATIENT_ID, _PATIENT_NAME = 0x00100020, 0x00100010
_BURNED_IN = 0x00280301

# Operations, decided per element.
OP_KEEP, OP_REMOVE, OP_EMPTY, OP_DUMMY, OP_CLEAN, OP_UID = 0, 1, 2, 3, 4, 5
OP_SEQ, OP_DATE, OP_TIME, OP_TEXT, OP_SAFE_TEXT, OP_PATIENT_ID, OP_PATIENT_NAME = (
    6, 7, 8, 9, 10, 11, 12
)
OP_KEEP_TABLE = 13  # kept by an option (K): its value is not an identifier
_ACTION_OPS = {
    Action.KEEP: OP_KEEP_TABLE,
    Action.REMOVE: OP_REMOVE,
    Action.EMPTY: OP_EMPTY,
    Action.DUMMY: OP_DUMMY,
    Action.CLEAN: OP_CLEAN,
    Action.UID: OP_UID,
}
_MODE_CLEAN, _MODE_DUMMY = 0, 1

# Identifier kinds (what the residue check and the cleaner look for).
_ID_NONE, _ID_TEXT, _ID_NAME, _ID_UID, _ID_DATE = 0, 1, 2, 3, 4

_ALNUM = bytes(1 if chr(i).isascii() and chr(i).isalnum() else 0 for i in range(256))
_DIGITISH = re.compile(rb"[0-9][0-9.]*")
_REDACTED = b"***"


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class DeidResult:
    """One de-identified instance. Fields marked PHI stay in memory (vault, maps), never logs."""

    data: bytes = field(repr=False)
    """The de-identified instance as a DICOM Part 10 file."""
    transfer_syntax: str
    sop_class_uid: str
    sop_key: str
    """Pseudonym of the original SOP Instance UID (the node's key of the instance)."""
    study_key: str
    series_key: str
    patient_key: str
    accession_key: str | None
    modality: str | None
    body_part: str | None
    view_position: str | None
    options: tuple[Code, ...]
    pixels_cleaned: bool
    pixel_rule: str | None
    residue: tuple[str, ...]
    """Keywords of identifying attributes whose value still appears in the output (empty = ok)."""
    vault_study: bytes = field(repr=False)
    """PHI: the original Patient and General Study attributes (see :mod:`node.deid.vault`)."""
    vault_instance: bytes = field(repr=False)
    """PHI: the original Study, Series, SOP Instance and SOP Class UIDs."""
    uid_map: dict[str, str] = field(repr=False, default_factory=dict)
    """PHI: original UID -> pseudonym, for ``fednode deid --write-maps``."""
    patient_map: tuple[str, str, str, str] = field(repr=False, default=("", "", "", ""))
    """PHI: (original Patient ID, original Patient's Name, new ID, new name)."""
    date_offset_days: int = field(repr=False, default=0)


@dataclass(frozen=True)
class _Needle:
    value: bytes
    keyword: str
    kind: int


# Top-level attributes read for gating, the database and the vault.
_HEADER_TAGS = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080050: "AccessionNumber",
    0x00080060: "Modality",
    0x00080070: "Manufacturer",
    0x00081090: "ManufacturerModelName",
    0x00100010: "PatientName",
    0x00100020: "PatientID",
    0x00100030: "PatientBirthDate",
    0x00180015: "BodyPartExamined",
    0x00185101: "ViewPosition",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280301: "BurnedInAnnotation",
}

# PS3.3 C.7.1.1 Patient and C.7.2.1 General Study modules (the vault's study record).
VAULT_STUDY_TAGS: frozenset[int] = frozenset(
    {
        0x00080005, 0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00080090, 0x00080096,
        0x0008009C, 0x0008009D, 0x00081030, 0x00081032, 0x00081048, 0x00081049, 0x00081060,
        0x00081062, 0x00081110, 0x00100010, 0x00100020, 0x00100021, 0x00100022, 0x00100024,
        0x00100026, 0x00100027, 0x00100028, 0x00100030, 0x00100032, 0x00100033, 0x00100034,
        0x00100035, 0x00100040, 0x00100200, 0x00100212, 0x00100213, 0x00100214, 0x00100215,
        0x00100216, 0x00100217, 0x00100218, 0x00100219, 0x00100221, 0x00100222, 0x00100223,
        0x00100229, 0x00101000, 0x00101001, 0x00101002, 0x00101100, 0x00102160, 0x00102201,
        0x00102202, 0x00102292, 0x00102293, 0x00102294, 0x00102295, 0x00102296, 0x00102297,
        0x00102298, 0x00102299, 0x00104000, 0x00120062, 0x00120063, 0x00120064, 0x0020000D,
        0x00200010, 0x00321033, 0x00321034, 0x00401012,
    }
)

_TOP_TAGS: frozenset[int] = (
    frozenset(_HEADER_TAGS) | VAULT_STUDY_TAGS | _PIXEL_TAGS | _PIXEL_SIZE_TAGS
)
"""The top-level elements a run keeps a handle on (header facts, vault, pixel module)."""


# --------------------------------------------------------------------------------------------
# The engine


class Deidentifier:
    """De-identifies instances with one node's profile, options and site key.

    Build one per process (it caches per-tag decisions) and call :meth:`deidentify` for a
    received dataset or :meth:`deidentify_file` for a DICOM file. The output bytes depend only
    on the input, the configuration and the site key.
    """

    def __init__(self, config: DeidSection, site_key: bytes) -> None:
        self.config = config
        self.site_key = site_key
        self.options = options_from_config(config)
        self.profile: Profile = build_profile(self.options)
        self.temporal = config.longitudinal
        self.retain_uids = Option.RETAIN_UIDS in self.options
        self.safe_private: frozenset[tuple[int, bytes, int]] = (
            frozenset(
                (s.group, s.creator.strip().lower().encode("latin-1"), s.element)
                for s in config.safe_private
            )
            if Option.RETAIN_SAFE_PRIVATE in self.options
            else frozenset()
        )
        self._ops: dict[int, int] = {}
        self._ids: dict[int, int] = {}
        self._prefix = config.patient_prefix
        self._uid_cache: dict[str, str] = {}
        self._constant = self._identity_text()

    # -- decisions ------------------------------------------------------------------------
    def op_for(self, tag: int, vr: str) -> int:
        """The operation for public *tag* (cached per dictionary-known tag)."""
        op = self._ops.get(tag)
        if op is not None:
            return op
        op = self._decide(tag, vr)
        if tag in DicomDictionary or vr != "UN":
            self._ops[tag] = op
        return op

    def _decide(self, tag: int, vr: str) -> int:
        group, elem = tag >> 16, tag & 0xFFFF
        if tag == _PATIENT_ID:
            return OP_PATIENT_ID
        if tag == _PATIENT_NAME:
            return OP_PATIENT_NAME
        action = self.profile.action(tag)
        if action is not None:
            op = _ACTION_OPS[action]
            if op == OP_KEEP_TABLE and vr == "SQ":
                return OP_SEQ
            if op == OP_UID and self.retain_uids:
                return OP_KEEP_TABLE
            return op
        if (
            elem == 0
            or group in (0x0000, 0x0002)
            or 0x5000 <= group <= 0x50FF
            or 0x6000 <= group <= 0x60FF
            or tag in (0xFFFAFFFA, 0xFFFCFFFC)
        ):
            return OP_REMOVE
        known = dictionary_vr(tag)
        if known != "UN" and "or" not in known:
            vr = known
        if vr == "SQ":
            return OP_SEQ
        if vr == "UI":
            if tag in CLASS_UID_TAGS or self.retain_uids:
                return OP_KEEP
            return OP_UID
        if vr in ("DA", "DT"):
            return OP_DATE
        if vr == "TM":
            return OP_TIME
        if vr == "PN":
            return OP_EMPTY
        if vr in _TEXT_VRS:
            return OP_SAFE_TEXT if keyword_for_tag(tag) in SAFE_TEXT_KEYWORDS else OP_TEXT
        if vr == "UN":
            return OP_REMOVE
        return OP_KEEP

    def ident_kind(self, tag: int, vr: str) -> int:
        """Whether the value of public *tag* identifies (and how it is matched)."""
        kind = self._ids.get(tag)
        if kind is not None:
            return kind
        op = self.op_for(tag, vr)
        known = dictionary_vr(tag)
        if known != "UN" and "or" not in known:
            vr = known
        kind = _ID_NONE
        if op in (OP_KEEP, OP_KEEP_TABLE, OP_SEQ, OP_TIME, OP_SAFE_TEXT, OP_TEXT):
            kind = _ID_NONE
        elif op == OP_CLEAN:
            kind = _ID_DATE if vr in ("DA", "DT") else _ID_NONE
        elif op == OP_DATE:
            kind = _ID_DATE if self.temporal != "full" else _ID_NONE
        elif vr == "PN" or op in (OP_PATIENT_NAME,):
            kind = _ID_NAME
        elif vr == "UI":
            kind = _ID_UID
        elif vr in ("DA", "DT"):
            kind = _ID_DATE
        elif vr in _TEXT_VRS or op == OP_PATIENT_ID:
            kind = _ID_TEXT
        self._ids[tag] = kind
        return kind

    # -- public API -------------------------------------------------------------------------
    def deidentify_file(self, data: bytes, *, repair: bool = True) -> DeidResult:
        """De-identify a DICOM file (Part 10, or a bare dataset); see :meth:`deidentify`."""
        body, syntax = split_part10(data)
        return self.deidentify(body, syntax, repair=repair)

    def deidentify(self, raw: bytes, transfer_syntax: str, *, repair: bool = True) -> DeidResult:
        """De-identify one dataset (no preamble, no File Meta) in *transfer_syntax*.

        With *repair*, a dataset whose encoding the engine refuses (truncated, explicit VR
        declared but implicit VR written ...) is read leniently by pydicom, written back
        well-formed, and de-identified from that.

        Raises
        ------
        RejectedInstance
            If the instance is not admitted (burned-in text and no pixel rule, a media
            directory, no SOP Instance UID ...).
        MalformedDataset
            If the bytes are not a dataset, even read leniently.
        """
        syntax = transfer_syntax.strip("\x00 ")
        try:
            return self._deidentify(raw, syntax)
        except MalformedDataset as exc:
            if not repair:
                raise
            logger.warning("malformed dataset (%s); de-identifying pydicom's reading of it", exc)
            body, fixed = normalize(wrap(raw, syntax))
            return self._deidentify(body, fixed)

    def _deidentify(self, raw: bytes, syntax: str) -> DeidResult:
        if syntax == DEFLATED_LE:
            raw, syntax = inflate(raw), EXPLICIT_LE
        return _Run(self, raw, syntax, little=syntax != EXPLICIT_BE).execute()

    # -- helpers ----------------------------------------------------------------------------
    def map_uid(self, uid: str) -> str:
        """The keyed pseudonym of *uid* (:func:`node.deid.pseudonyms.uid_pseudonym`)."""
        mapped = self._uid_cache.get(uid)
        if mapped is None:
            mapped = uid_pseudonym(self.site_key, uid)
            if len(self._uid_cache) < 50_000:
                self._uid_cache[uid] = mapped
        return mapped

    def patient_key(self, identity: str) -> str:
        """The keyed token of a patient (the database's ``patient_key``)."""
        return token(self.site_key, "patient-id", identity)

    def patient_token(self, identity: str) -> str:
        """The pseudonymous Patient ID written into the output: prefix + keyed token."""
        return self._prefix + self.patient_key(identity)

    def method_codes(self, pixels_cleaned: bool) -> tuple[Code, ...]:
        """113100 and one CID 7050 code per active option (113101 when pixels were cleaned)."""
        codes = [BASIC_PROFILE_CODE]
        active = set(self.options)
        if pixels_cleaned:
            active.add(Option.CLEAN_PIXEL_DATA)
        for option, code in sorted(OPTION_CODES.items(), key=lambda kv: kv[1].value):
            if option in active:
                codes.append(code)
        return tuple(codes)

    def _identity_text(self) -> bytes:
        parts = [c.meaning.encode() for c in self.method_codes(True)]
        parts += [DUMMY_TEXT, b"YES", b"NO", b"MODIFIED", b"UNMODIFIED", b"REMOVED", b"DCM"]
        return b"\\".join(parts)


def options_from_config(config: DeidSection) -> frozenset[Option]:
    """The profile options the configuration turns on (PS3.15 E.3)."""
    flags = {
        Option.RETAIN_PATIENT_CHARACTERISTICS: config.retain_patient_characteristics,
        Option.RETAIN_DEVICE_IDENTITY: config.retain_device_identity,
        Option.RETAIN_INSTITUTION_IDENTITY: config.retain_institution_identity,
        Option.RETAIN_SAFE_PRIVATE: config.retain_safe_private,
        Option.RETAIN_UIDS: config.retain_uids,
        Option.CLEAN_DESCRIPTORS: config.clean_descriptors,
        Option.CLEAN_STRUCTURED_CONTENT: config.clean_structured_content,
        Option.CLEAN_GRAPHICS: config.clean_graphics,
        Option.RETAIN_LONGITUDINAL_FULL_DATES: config.longitudinal == "full",
        Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: config.longitudinal == "modified",
    }
    return frozenset(o for o, on in flags.items() if on)


def _strip(value: bytes) -> bytes:
    return value.strip(b" \x00")


def _has_letter(value: bytes) -> bool:
    return any(c >= 0x80 or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) for c in value)


def find_bounded(hay: bytes, needle: bytes, start: int = 0) -> int:
    """Index of *needle* in *hay* not inside a longer alphanumeric run, or -1."""
    n = len(needle)
    head, tail = _ALNUM[needle[0]], _ALNUM[needle[-1]]
    size = len(hay)
    while True:
        i = hay.find(needle, start)
        if i < 0:
            return -1
        if (not head or i == 0 or not _ALNUM[hay[i - 1]]) and (
            not tail or i + n >= size or not _ALNUM[hay[i + n]]
        ):
            return i
        start = i + 1


class _Run:
    """The state of de-identifying one instance."""

    def __init__(self, engine: Deidentifier, buf: bytes, syntax: str, *, little: bool) -> None:
        self.e = engine
        self.buf = buf
        self.mv = memoryview(buf)
        self.syntax = syntax
        self.little = little
        self.in_implicit = syntax == IMPLICIT_LE
        self.out_implicit = self.in_implicit
        self.out_syntax = syntax
        end = "<" if little else ">"
        self.s_tag_len = struct.Struct(end + "HHL")
        self.s_tag_vr_short = struct.Struct(end + "HH2sH")
        self.s_tag_vr_long = struct.Struct(end + "HH2sHL")
        self.needles: dict[bytes, _Needle] = {}
        self.keep_values: set[bytes] = set()
        self.uid_map: dict[str, str] = {}
        self.offset = 0
        self.top: dict[int, Element] = {}
        self.patient_identity = ""
        self.patient_ident = ""
        self.patient_out = ""
        self.name_out = ""
        self.scrub_list: list[bytes] | None = None

    # -- values -----------------------------------------------------------------------------
    def value(self, el: Element) -> bytes:
        return self.buf[el.vstart : el.vend]

    def text(self, tag: int) -> str | None:
        el = self.top.get(tag)
        if el is None or el.items is not None:
            return None
        return _strip(self.value(el)).decode("latin-1")

    def us(self, tag: int) -> int | None:
        el = self.top.get(tag)
        if el is None or el.vend - el.vstart < 2:
            return None
        fmt = "<H" if (self.little or el.implicit) else ">H"
        return int(struct.unpack_from(fmt, self.buf, el.vstart)[0])

    # -- identifiers ------------------------------------------------------------------------
    def collect(self, elems: Iterable[Element]) -> None:
        """Record every identifying value of the instance (and the values options keep)."""
        e = self.e
        for el in elems:
            tag = el.tag
            if el.items is not None:
                for item in el.items:
                    self.collect(item)
                continue
            if tag >> 16 & 1 or el.vend == el.vstart:
                continue
            kind = e.ident_kind(tag, el.vr)
            if kind == _ID_NONE:
                if e.op_for(tag, el.vr) == OP_KEEP_TABLE:
                    raw = self.value(el)
                    self.keep_values.add(_strip(raw))
                    self.keep_values.update(_strip(v) for v in raw.split(b"\\"))
                continue
            self.add_needles(self.value(el), kind, e.profile.names.get(tag) or _keyword(tag))

    def add_needles(self, raw: bytes, kind: int, keyword: str) -> None:
        needles = self.needles
        for value in raw.split(b"\\"):
            value = _strip(value)
            if not value:
                continue
            if kind == _ID_UID:
                if len(value) >= 8 and not value.startswith(b"1.2.840.10008."):
                    needles.setdefault(value, _Needle(value, keyword, _ID_UID))
                continue
            if kind == _ID_DATE:
                # the value up to a DT time zone offset: what the residue check tokenizes
                stamp = re.split(rb"[+-]", value, maxsplit=1)[0].rstrip(b".")
                if len(stamp) >= 8 and stamp[:8].isdigit():
                    needles.setdefault(stamp, _Needle(stamp, keyword, _ID_DATE))
                continue
            parts = [value]
            if kind == _ID_NAME:
                for group in value.split(b"="):
                    parts.append(group.strip())
                    parts.extend(p.strip() for p in group.split(b"^"))
            for part in parts:
                if _has_letter(part):
                    if len(part) >= 4 or (kind == _ID_NAME and len(part) >= 3):
                        needles.setdefault(part, _Needle(part, keyword, _ID_TEXT))
                elif len(part) >= 6:
                    needles.setdefault(part, _Needle(part, keyword, _ID_DATE))

    def finish_needles(self) -> None:
        """Drop needles that the output legitimately holds (kept values, our constants)."""
        constant = self.e._constant
        kept = self.keep_values
        for value in list(self.needles):
            if value in kept or (self.needles[value].kind != _ID_UID and value in constant):
                del self.needles[value]
        if self.patient_out:
            self.needles.pop(self.patient_out.encode(), None)

    def scrub(self, raw: bytes) -> bytes | None:
        """*raw* with every identifying value removed, or ``None`` if it holds none."""
        if self.scrub_list is None:
            self.scrub_list = sorted(
                (n.value.lower() for n in self.needles.values() if n.kind != _ID_UID),
                key=len,
                reverse=True,
            )
        low = raw.lower()
        changed = False
        for needle in self.scrub_list:
            if needle not in low:
                continue
            i = find_bounded(low, needle)
            while i >= 0:
                raw = raw[:i] + _REDACTED + raw[i + len(needle) :]
                low = low[:i] + _REDACTED + low[i + len(needle) :]
                changed = True
                i = find_bounded(low, needle, i + len(_REDACTED))
        return raw if changed else None

    def residue(self, header: bytes) -> tuple[str, ...]:
        """Keywords of identifying attributes whose value appears in *header*."""
        found: set[str] = set()
        tokens: set[bytes] | None = None
        for needle in self.needles.values():
            if needle.kind in (_ID_UID, _ID_DATE):
                if tokens is None:
                    tokens = {t.rstrip(b".") for t in _DIGITISH.findall(header)}
                if needle.value in tokens:
                    found.add(needle.keyword)
            elif needle.value in header and find_bounded(header, needle.value) >= 0:
                found.add(needle.keyword)
        return tuple(sorted(found))

    # -- encoding ---------------------------------------------------------------------------
    def header(self, tag: int, vr: str, length: int) -> bytes:
        group, elem = tag >> 16, tag & 0xFFFF
        if self.out_implicit:
            return self.s_tag_len.pack(group, elem, length)
        if vr in LONG_VRS:
            return self.s_tag_vr_long.pack(group, elem, vr.encode(), 0, length)
        if length > 0xFFFF:
            return self.s_tag_vr_long.pack(group, elem, b"UN", 0, length)
        return self.s_tag_vr_short.pack(group, elem, vr.encode(), length)

    def element(self, tag: int, vr: str, value: bytes) -> bytes:
        if len(value) & 1:
            value += b"\x00" if vr in ("UI", "OB", "UN") else b" "
        return self.header(tag, vr, len(value)) + value

    def out_vr(self, el: Element) -> str:
        vr = el.vr
        if vr == "UN" or vr == "NONE" or " " in vr:
            known = dictionary_vr(el.tag)
            return known if " " not in known else "UN"
        return vr

    def keep(self, el: Element, out: list[bytes | memoryview]) -> int:
        """Copy *el* as encoded (re-encoding the header if the encoding differs)."""
        if el.implicit == self.out_implicit:
            out.append(self.mv[el.start : el.end])
            return el.end - el.start
        if not self.little:
            raise MalformedDataset("an implicit VR sequence inside a big endian dataset")
        vr = self.out_vr(el)
        value = self.mv[el.vstart : el.vend]
        head = self.header(el.tag, vr, el.vend - el.vstart)
        out.append(head)
        out.append(value)
        return len(head) + len(value)

    def put(self, el: Element, vr: str, value: bytes, out: list[bytes | memoryview]) -> int:
        chunk = self.element(el.tag, vr, value)
        out.append(chunk)
        return len(chunk)

    # -- the walk -----------------------------------------------------------------------------
    def emit(
        self,
        elems: list[Element],
        mode: int,
        out: list[bytes | memoryview],
        per_tag: dict[int, list[bytes | memoryview]] | None = None,
    ) -> int:
        """Write the de-identified form of one dataset (or item) to *out*; return its size.

        With *per_tag* (the top level), each element's chunks go to ``per_tag[tag]`` instead.
        """
        e = self.e
        total = 0
        private: dict[int, bool] | None = None
        for el in elems:
            tag = el.tag
            target = out if per_tag is None else per_tag.setdefault(tag, [])
            if tag >> 16 & 1:
                if not e.safe_private:
                    continue
                if private is None:
                    private = self.private_plan(elems)
                if not private.get(tag, False):
                    continue
                if el.items is not None:
                    total += self.sequence(el, mode, target)
                else:
                    total += self.keep(el, target)
                continue
            op = e.op_for(tag, el.vr)
            if op == OP_REMOVE:
                continue
            if el.items is not None:
                if op == OP_EMPTY:
                    total += self.put(el, "SQ", b"", target)
                else:
                    total += self.sequence(el, _MODE_DUMMY if op == OP_DUMMY else mode, target)
            elif op == OP_KEEP or op == OP_KEEP_TABLE:
                total += self.keep(el, target)
            else:
                total += self.transform(el, op, mode, target)
        if per_tag is not None:
            for tag in [t for t, chunks in per_tag.items() if not chunks]:
                del per_tag[tag]
        return total

    def transform(self, el: Element, op: int, mode: int, out: list[bytes | memoryview]) -> int:
        """Apply a value-changing operation to a non-sequence element."""
        vr = self.out_vr(el)
        raw = self.value(el)
        if op == OP_EMPTY:
            return self.put(el, vr, b"", out)
        if op == OP_DUMMY:
            return self.put(el, vr, self.dummy(vr, raw), out)
        if op == OP_UID:
            return self.put(el, vr, self.uids(raw), out)
        if op == OP_DATE or (op == OP_CLEAN and vr in ("DA", "DT")):
            if self.e.temporal == "full" and op == OP_DATE:
                return self.keep(el, out)
            if self.e.temporal == "off" and op == OP_DATE:
                return self.put(el, vr, b"", out)
            if vr not in ("DA", "DT"):
                return self.keep(el, out)
            return self.put(el, vr, shift_values(raw, vr, self.offset), out)
        if op == OP_TIME:
            if self.e.temporal == "off":
                return self.put(el, vr, b"", out)
            return self.keep(el, out)
        if op == OP_PATIENT_ID:
            value = _strip(raw)
            if not value:
                return self.keep(el, out)
            if value.decode("latin-1") == self.patient_identity:
                return self.put(el, vr, self.patient_out.encode(), out)
            new = self.e.patient_token(value.decode("latin-1"))
            return self.put(el, vr, new.encode(), out)
        if op == OP_PATIENT_NAME:
            value = _strip(raw)
            if not value:
                return self.keep(el, out)
            return self.put(el, vr, self.name_out.encode(), out)
        if op == OP_TEXT and mode == _MODE_DUMMY:
            if not _strip(raw):
                return self.keep(el, out)
            return self.put(el, vr, self.dummy(vr, raw), out)
        if op in (OP_TEXT, OP_SAFE_TEXT, OP_CLEAN):
            if vr in _TEXT_VRS:
                cleaned = self.scrub(raw) if self.needles else None
                if cleaned is None:
                    return self.keep(el, out)
                return self.put(el, vr, cleaned, out)
            if vr == "UI":
                return self.put(el, vr, self.uids(raw), out)
            if vr == "PN":
                return self.put(el, vr, self.dummy(vr, raw), out)
            if vr == "TM" and self.e.temporal == "off":
                return self.put(el, vr, b"", out)
            return self.keep(el, out)
        return self.keep(el, out)

    def sequence(self, el: Element, mode: int, out: list[bytes | memoryview]) -> int:
        assert el.items is not None
        body: list[bytes | memoryview] = []
        size = 0
        item_head = self.s_tag_len
        for item in el.items:
            chunks: list[bytes | memoryview] = []
            n = self.emit(item, mode, chunks)
            head = item_head.pack(0xFFFE, 0xE000, n)
            body.append(head)
            body.extend(chunks)
            size += 8 + n
        head = self.header(el.tag, "SQ", size)
        out.append(head)
        out.extend(body)
        return len(head) + size

    def private_plan(self, elems: list[Element]) -> dict[int, bool]:
        """Which private elements of one item the safe list keeps (creators included)."""
        creators: dict[int, bytes] = {}
        keep: dict[int, bool] = {}
        used: set[int] = set()
        for el in elems:
            tag = el.tag
            group, elem = tag >> 16, tag & 0xFFFF
            if not group & 1 or group in (0x0001, 0x0003, 0x0005, 0x0007, 0xFFFF):
                continue
            if 0x0010 <= elem <= 0x00FF:
                creators[group << 16 | elem] = _strip(self.value(el)).lower()
                continue
            if elem < 0x1000:
                continue
            block = group << 16 | elem >> 8
            creator = creators.get(block)
            if creator is not None and (group, creator, elem & 0xFF) in self.e.safe_private:
                keep[tag] = True
                used.add(block)
        for block in used:
            keep[block] = True
        return keep

    def dummy(self, vr: str, raw: bytes) -> bytes:
        """A dummy value consistent with *vr* (action D)."""
        if vr in ("DA",):
            return b"19000101"
        if vr == "DT":
            return b"19000101000000"
        if vr == "TM":
            return b"000000"
        if vr == "UI":
            return self.uids(raw) if _strip(raw) else self.e.map_uid("dummy").encode()
        if vr in ("IS", "DS"):
            return b"0"
        if vr == "AS":
            return b"000D"
        if vr in ("US", "SS"):
            return b"\x00\x00"
        if vr in ("UL", "SL", "FL", "AT"):
            return b"\x00\x00\x00\x00"
        if vr in ("FD", "SV", "UV"):
            return b"\x00" * 8
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            return b"\x00\x00"
        return DUMMY_TEXT

    def uids(self, raw: bytes) -> bytes:
        values = []
        for part in raw.split(b"\\"):
            uid = part.strip(b" \x00").decode("ascii", "replace")
            if not uid or uid.startswith(_REGISTERED_ROOT):
                values.append(uid)
                continue
            new = self.uid_map.get(uid)
            if new is None:
                new = self.e.map_uid(uid)
                self.uid_map[uid] = new
            values.append(new)
        return "\\".join(values).encode("ascii")

    # -- one instance -----------------------------------------------------------------------
    def execute(self) -> DeidResult:
        if self.syntax not in _NATIVE and not self.syntax.startswith("1.2.840.10008.1.2."):
            raise MalformedDataset("the transfer syntax is not a DICOM transfer syntax")
        elems = parse(self.buf, self.syntax)
        for el in elems:
            if el.tag in _TOP_TAGS:
                self.top[el.tag] = el
        e = self.e
        sop_class = self.text(0x00080016) or ""
        sop_uid = self.text(0x00080018) or ""
        if sop_class == "1.2.840.10008.1.3.10" or any(el.tag == 0x00041220 for el in elems):
            raise RejectedInstance("a DICOMDIR is a media directory, not an instance")
        if not sop_class or not sop_uid:
            raise RejectedInstance("the dataset has no SOP Class UID or SOP Instance UID")
        study_uid = self.text(0x0020000D) or ""
        series_uid = self.text(0x0020000E) or ""
        self.check_pixel_size()

        decision = pixels.assess(
            pixels.Header(
                sop_class_uid=sop_class,
                modality=(self.text(0x00080060) or "").upper(),
                burned_in=(self.text(_BURNED_IN) or "").upper() or None,
                manufacturer=self.text(0x00080070) or "",
                model=self.text(0x00081090) or "",
                rows=self.us(0x00280010),
                columns=self.us(0x00280011),
                has_pixels=0x7FE00010 in self.top,
            ),
            e.config,
        )

        pid = self.text(_PATIENT_ID) or ""
        name = self.text(_PATIENT_NAME) or ""
        if pid:
            identity = pid
        else:
            identity = "name:" + name + "|" + (self.text(0x00100030) or "")
        self.patient_identity = pid
        self.patient_ident = identity
        self.patient_out = e.patient_token(identity)
        self.name_out = self.patient_out + "^"
        low, high = e.config.date_shift_days
        self.offset = offset_days(e.site_key, identity, low, high)

        self.collect(elems)
        self.finish_needles()

        top_out: dict[int, list[bytes | memoryview]] = {}
        self.emit(elems, _MODE_CLEAN, [], top_out)
        pixels_cleaned = False
        if decision.rule is not None:
            changed, removed, self.out_syntax = pixels.clean(
                self.buf, [el for el in elems if el.tag in pixels.PIXEL_MODULE_TAGS],
                self.syntax, decision.rule,
            )
            for tag in removed:
                top_out.pop(tag, None)
            for tag, chunk in changed.items():
                top_out[tag] = [chunk]
            pixels_cleaned = True
        codes = e.method_codes(pixels_cleaned)
        self.identity(top_out, codes, decision.burned_in_out)

        new_sop = self.uids(sop_uid.encode()).decode() if not e.retain_uids else sop_uid
        meta = self.file_meta(sop_class, new_sop)
        pieces: list[bytes | memoryview] = [meta]
        header_pieces: list[bytes | memoryview] = [meta]
        for tag in sorted(top_out):
            chunks = top_out[tag]
            pieces.extend(chunks)
            if tag not in _PIXEL_TAGS:
                header_pieces.extend(chunks)
        data = b"".join(pieces)
        residue = self.residue(b"".join(header_pieces))

        accession = self.text(0x00080050) or ""
        return DeidResult(
            data=data,
            transfer_syntax=self.out_syntax,
            sop_class_uid=sop_class,
            sop_key=e.map_uid(sop_uid),
            study_key=e.map_uid(study_uid) if study_uid else "",
            series_key=e.map_uid(series_uid) if series_uid else "",
            patient_key=e.patient_key(self.patient_ident),
            accession_key=token(e.site_key, "accession", accession) if accession else None,
            modality=self.text(0x00080060) or None,
            body_part=self.text(0x00180015) or None,
            view_position=self.text(0x00185101) or None,
            options=codes,
            pixels_cleaned=pixels_cleaned,
            pixel_rule=decision.rule.name if decision.rule is not None else None,
            residue=residue,
            vault_study=self.vault_study(),
            vault_instance=self.vault_instance(sop_class, sop_uid, study_uid, series_uid),
            uid_map=dict(self.uid_map),
            patient_map=(pid, name, self.patient_out, self.name_out),
            date_offset_days=self.offset,
        )

    def check_pixel_size(self) -> None:
        """Refuse native Pixel Data shorter than its Image Pixel module says (PS3.5 8.1.1):
        a truncated instance would be written out with pixels that no longer decode.

        Longer values (padding) are left alone, as readers accept them.
        """
        el = self.top.get(0x7FE00010)
        if el is None or self.syntax not in _NATIVE:
            return
        rows, columns = self.us(0x00280010), self.us(0x00280011)
        bits = self.us(0x00280100)
        if not rows or not columns or not bits:
            raise RejectedInstance(
                "Pixel Data is present but Rows, Columns or Bits Allocated is missing or 0 "
                "(PS3.3 C.7.6.3): the pixels cannot be decoded"
            )
        samples = self.us(0x00280002) or 1
        frames_text = (self.text(0x00280008) or "1").strip()
        try:
            frames = max(1, int(frames_text))
        except ValueError:
            raise RejectedInstance(
                "Number of Frames is not an integer: the pixels cannot be decoded"
            ) from None
        photometric = (self.text(0x00280004) or "").strip().upper()
        # 4:2:2 subsampled YCbCr: two chroma samples shared by each pair of pixels
        # (PS3.3 C.7.6.3.1.2), so two values per pixel on average.
        per_pixel = 2 if samples == 3 and photometric.endswith("_422") else samples
        needed = (rows * columns * per_pixel * frames * bits + 7) // 8
        present = el.vend - el.vstart
        if present < needed:
            raise RejectedInstance(
                f"Pixel Data holds {present} bytes, its Image Pixel module needs {needed} "
                f"(Rows {rows} x Columns {columns} x Samples per Pixel {samples} x Bits "
                f"Allocated {bits} x {frames} frame(s)): the instance is truncated or its pixel "
                "data does not match its pixel module, and would not decode"
            )

    def identity(
        self,
        top_out: dict[int, list[bytes | memoryview]],
        codes: tuple[Code, ...],
        burned_in: str | None,
    ) -> None:
        """Set the PS3.15 E.1.1 identity attributes at the top level."""

        def text(tag: int, vr: str, value: str) -> bytes:
            return self.element(tag, vr, value.encode("ascii"))

        top_out[0x00120062] = [text(0x00120062, "CS", "YES")]
        method = "\\".join(c.meaning[:64] for c in codes)
        top_out[0x00120063] = [text(0x00120063, "LO", method)]
        items = []
        for code in codes:
            item = (
                text(0x00080100, "SH", code.value)
                + text(0x00080102, "SH", code.scheme)
                + text(0x00080104, "LO", code.meaning)
            )
            items.append(self.s_tag_len.pack(0xFFFE, 0xE000, len(item)) + item)
        seq = b"".join(items)
        top_out[0x00120064] = [self.header(0x00120064, "SQ", len(seq)) + seq]
        temporal = {"modified": "MODIFIED", "full": "UNMODIFIED", "off": "REMOVED"}
        top_out[0x00280303] = [text(0x00280303, "CS", temporal[self.e.temporal])]
        if burned_in is not None:
            top_out[_BURNED_IN] = [text(_BURNED_IN, "CS", burned_in)]

    def file_meta(self, sop_class: str, sop_instance: str) -> bytes:
        """A new File Meta Information group naming fednode (PS3.10 7.1, PS3.15 E.1.1 7)."""

        def ui(elem: int, value: str) -> bytes:
            raw = value.encode("ascii")
            if len(raw) & 1:
                raw += b"\x00"
            return struct.pack("<HH2sH", 0x0002, elem, b"UI", len(raw)) + raw

        name = IMPLEMENTATION_VERSION_NAME.encode("ascii")
        if len(name) & 1:
            name += b" "
        body = (
            struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
            + ui(0x0002, sop_class)
            + ui(0x0003, sop_instance)
            + ui(0x0010, self.out_syntax)
            + ui(0x0012, IMPLEMENTATION_CLASS_UID)
            + struct.pack("<HH2sH", 0x0002, 0x0013, b"SH", len(name)) + name
        )
        group_length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body))
        return b"\x00" * 128 + b"DICM" + group_length + body

    def vault_study(self) -> bytes:
        """PHI: the original top-level Patient and General Study elements, as encoded."""
        spans = [self.buf[el.start : el.end] for tag, el in sorted(self.top.items())
                 if tag in VAULT_STUDY_TAGS]
        return _vault_blob(self.syntax, b"".join(spans))

    def vault_instance(self, sop_class: str, sop_uid: str, study: str, series: str) -> bytes:
        """PHI: the original UIDs of the instance, Explicit VR Little Endian."""
        return _vault_blob(EXPLICIT_LE, _le_uids(sop_class, sop_uid, study, series))


def _le_uids(*values: str) -> bytes:
    out = []
    for tag, value in zip((0x00080016, 0x00080018, 0x0020000D, 0x0020000E), values, strict=True):
        if not value:
            continue
        raw = value.encode("ascii")
        if len(raw) & 1:
            raw += b"\x00"
        out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(raw)) + raw)
    return b"".join(out)


def _vault_blob(syntax: str, body: bytes) -> bytes:
    head = syntax.encode("ascii")
    return bytes([len(head)]) + head + body


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"

