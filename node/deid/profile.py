"""The Basic Application Level Confidentiality Profile as data (DICOM PS3.15 Annex E).

Table E.1-1 ships as package data (``data/table_e1_1_2024b.csv``, every option column, and
``data/table_e1_1_2026c_additions.csv``, the attributes release 2026c adds). :func:`build_profile`
turns the table and the options an admin turned on into one resolved :class:`Action` per tag:

* an option's action overrides the Basic Profile's (PS3.15 E.1.1: "a requirement for an
  Option, when implemented, overrides any requirement for the underlying Profile"); where two
  active options name the same attribute, keeping (``K``) wins over cleaning (``C``);
* compound actions are resolved without looking up the IOD of each instance, choosing the least
  destructive member that keeps every IOD the attribute appears in conformant:

  - ``X/Z`` -> ``Z``: an empty value is conformant whether the attribute is Type 2 or Type 3;
  - ``Z/D`` and ``X/Z/D`` -> ``D`` if the attribute is Type 1 in some standard IOD
    (:data:`TYPE1_SOMEWHERE`, compiled from PS3.3), else ``Z``;
  - ``X/D`` -> ``D`` if the attribute is Type 1 or Type 2 in some standard IOD
    (:data:`TYPE1_SOMEWHERE` or :data:`TYPE2_SOMEWHERE`), else ``X``;
  - ``X/Z/U*`` -> ``K`` on the sequence: it is kept, and every UID inside it is replaced by its
    own rule (``U``), which is what "replacement of contained instance UIDs" asks for.

Attributes that the table does not name are the engine's business (keep-known-safe and rules by
Value Representation, see :mod:`node.deid.engine`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from importlib import resources

from pydicom.datadict import keyword_for_tag

logger = logging.getLogger(__name__)

TABLE_FILE = "table_e1_1_2024b.csv"
ADDITIONS_FILE = "table_e1_1_2026c_additions.csv"


class Action(StrEnum):
    """The action codes of PS3.15 Table E.1-1a, after compound actions are resolved."""

    KEEP = "K"
    """Keep (unchanged for non-sequence attributes, cleaned for sequences)."""
    REMOVE = "X"
    """Remove."""
    EMPTY = "Z"
    """Replace with a zero-length value."""
    DUMMY = "D"
    """Replace with a non-zero length dummy value consistent with the VR."""
    CLEAN = "C"
    """Replace with values of similar meaning known not to identify (dates: shifted)."""
    UID = "U"
    """Replace with a non-zero length UID, consistent within a set of instances."""


class Option(StrEnum):
    """The profile options of PS3.15 E.3, named after their Table E.1-1 columns."""

    RETAIN_SAFE_PRIVATE = "rtnSafePrivOpt"
    RETAIN_UIDS = "rtnUIDsOpt"
    RETAIN_DEVICE_IDENTITY = "rtnDevIdOpt"
    RETAIN_INSTITUTION_IDENTITY = "rtnInstIdOpt"
    RETAIN_PATIENT_CHARACTERISTICS = "rtnPatCharsOpt"
    RETAIN_LONGITUDINAL_FULL_DATES = "rtnLongFullDatesOpt"
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "rtnLongModifDatesOpt"
    CLEAN_DESCRIPTORS = "cleanDescOpt"
    CLEAN_STRUCTURED_CONTENT = "cleanStructContOpt"
    CLEAN_GRAPHICS = "cleanGraphOpt"
    CLEAN_PIXEL_DATA = "cleanPixelData"
    """Not a table column: declared for an instance whose pixels a pixel rule cleaned."""


@dataclass(frozen=True)
class Code:
    """A coded concept (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str


BASIC_PROFILE_CODE = Code("113100", "DCM", "Basic Application Confidentiality Profile")
"""CID 7050 (PS3.16): the code every de-identified instance carries."""

OPTION_CODES: Mapping[Option, Code] = {
    Option.CLEAN_PIXEL_DATA: Code("113101", "DCM", "Clean Pixel Data Option"),
    Option.CLEAN_GRAPHICS: Code("113103", "DCM", "Clean Graphics Option"),
    Option.CLEAN_STRUCTURED_CONTENT: Code("113104", "DCM", "Clean Structured Content Option"),
    Option.CLEAN_DESCRIPTORS: Code("113105", "DCM", "Clean Descriptors Option"),
    Option.RETAIN_LONGITUDINAL_FULL_DATES: Code(
        "113106", "DCM", "Retain Longitudinal Temporal Information Full Dates Option"
    ),
    Option.RETAIN_LONGITUDINAL_MODIFIED_DATES: Code(
        "113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"
    ),
    Option.RETAIN_PATIENT_CHARACTERISTICS: Code(
        "113108", "DCM", "Retain Patient Characteristics Option"
    ),
    Option.RETAIN_DEVICE_IDENTITY: Code("113109", "DCM", "Retain Device Identity Option"),
    Option.RETAIN_UIDS: Code("113110", "DCM", "Retain UIDs Option"),
    Option.RETAIN_SAFE_PRIVATE: Code("113111", "DCM", "Retain Safe Private Option"),
    Option.RETAIN_INSTITUTION_IDENTITY: Code(
        "113112", "DCM", "Retain Institution Identity Option"
    ),
}
"""CID 7050 "De-identification Method" (PS3.16): one code per option."""

# Attributes with a compound action that are Type 1 in at least one standard IOD (PS3.3):
# Content Date/Time (SR Document General, Presentation State Identification, enhanced
# multi-frame images), Acquisition DateTime (enhanced images), Device Serial Number and
# Institution Name (Enhanced General Equipment), Instruction Performed DateTime,
# Start/End Acquisition DateTime and Observation DateTime (Type 1 where their macro is used),
# Referenced Performed Procedure Step Sequence (Type 1C references).
TYPE1_SOMEWHERE: frozenset[int] = frozenset(
    {
        0x00080023,  # Content Date
        0x00080033,  # Content Time
        0x0008002A,  # Acquisition DateTime
        0x00181000,  # Device Serial Number
        0x00080080,  # Institution Name
        0x00189919,  # Instruction Performed DateTime
        0x00189516,  # Start Acquisition DateTime
        0x00189517,  # End Acquisition DateTime
        0x0040A032,  # Observation DateTime
        0x00081111,  # Referenced Performed Procedure Step Sequence
        0x00100020,  # Patient ID (replaced by a keyed token anyway)
    }
)
# Attributes with an X/D action that are Type 2 in at least one standard IOD (PS3.3):
# RT Plan Date/Time (RT General Plan), Treatment Date/Time (RT treatment records),
# First/Most Recent Treatment Date (RT Treatment Summary Record), Protocol Name (enhanced
# series), Series Date/Time (Type 1C/2 in enhanced and RT series).
TYPE2_SOMEWHERE: frozenset[int] = frozenset(
    {
        0x300A0006,  # RT Plan Date
        0x300A0007,  # RT Plan Time
        0x30080250,  # Treatment Date
        0x30080251,  # Treatment Time
        0x30080054,  # First Treatment Date
        0x30080056,  # Most Recent Treatment Date
        0x00181030,  # Protocol Name
        0x00080021,  # Series Date
        0x00080031,  # Series Time
    }
)


@dataclass(frozen=True)
class TableRow:
    """One row of Table E.1-1: a tag (or a pattern), its Basic Profile and option actions."""

    pattern: str
    """The tag as the standard writes it, e.g. ``(0010,0010)`` or ``(60XX,3000)``."""
    tag: int | None
    """The tag as an int, ``None`` for repeating-group and private patterns."""
    name: str
    basic: str
    options: Mapping[Option, str] = field(default_factory=dict)
    vr: str = ""
    in_standard_iod: bool = True


def _parse_tag(pattern: str) -> int | None:
    text = pattern.strip().strip("()").replace(",", "")
    try:
        return int(text, 16)
    except ValueError:
        return None


def _read(name: str) -> list[dict[str, str]]:
    data = resources.files("node.deid").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(data)))


@lru_cache(maxsize=1)
def load_table() -> tuple[TableRow, ...]:
    """Table E.1-1 (2024b) plus the 2026c additions, as rows.

    The additions carry only a Basic Profile action; a ``U`` among them gets the Retain UIDs
    Option's ``K`` like every ``U`` row of the table, and Ethnic Group Code Sequence gets the
    Retain Patient Characteristics Option's ``K`` like Ethnic Group.
    """
    rows: list[TableRow] = []
    seen: set[str] = set()
    option_columns = [o for o in Option if o is not Option.CLEAN_PIXEL_DATA]
    for raw in _read(TABLE_FILE):
        pattern = raw["tag"].strip().upper()
        options: dict[Option, str] = {
            o: raw[o.value].strip() for o in option_columns if raw.get(o.value, "").strip()
        }
        rows.append(
            TableRow(
                pattern=pattern,
                tag=_parse_tag(pattern),
                name=raw["name"].splitlines()[0].strip(),
                basic=raw["basicProfile"].strip(),
                options=options,
                vr=raw.get("VR", "").strip(),
                in_standard_iod=raw.get("stdCompIOD", "Y").strip() == "Y",
            )
        )
        seen.add(pattern)
    for raw in _read(ADDITIONS_FILE):
        pattern = raw["tag"].strip().upper()
        if pattern in seen:
            continue
        tag = _parse_tag(pattern)
        basic = raw["basicProfile"].strip()
        added: dict[Option, str] = {}
        if basic == "U":
            added[Option.RETAIN_UIDS] = "K"
        if tag == 0x00102161:
            added[Option.RETAIN_PATIENT_CHARACTERISTICS] = "K"
        name = raw.get("name", "").strip() or (keyword_for_tag(tag) if tag is not None else "")
        rows.append(
            TableRow(
                pattern=pattern, tag=tag, name=name, basic=basic, options=added,
                vr=raw.get("VR", "").strip(),
            )
        )
    return tuple(rows)


def resolve(code: str, tag: int | None) -> Action:
    """Resolve one action code of Table E.1-1a, compound ones included (see the module doc)."""
    code = code.strip().upper()
    if code in ("K", "X", "Z", "D", "C", "U"):
        return Action(code)
    if code == "X/Z":
        return Action.EMPTY
    if code in ("Z/D", "X/Z/D"):
        return Action.DUMMY if tag in TYPE1_SOMEWHERE else Action.EMPTY
    if code == "X/D":
        if tag in TYPE1_SOMEWHERE or tag in TYPE2_SOMEWHERE:
            return Action.DUMMY
        return Action.REMOVE
    if code == "X/Z/U*":
        return Action.KEEP
    raise ValueError(f"unknown Table E.1-1a action code {code!r}")


@dataclass(frozen=True)
class Profile:
    """The resolved action of every tag that Table E.1-1 names, for one set of options."""

    options: frozenset[Option]
    actions: Mapping[int, Action]
    names: Mapping[int, str]
    private_action: Action
    """What happens to private attributes (``X``, or ``C`` with Retain Safe Private)."""
    overlay_action: Action
    """Overlays (60xx) and curves (50xx): always ``X`` (see :func:`build_profile`)."""

    def action(self, tag: int) -> Action | None:
        """The action for *tag*, or ``None`` if the table does not name it."""
        return self.actions.get(tag)


def build_profile(options: frozenset[Option] | set[Option]) -> Profile:
    """Resolve Table E.1-1 for *options* (PS3.15 E.2, E.3).

    The repeating-group rows (overlays 60xx, curves 50xx) resolve to ``X`` even with the Clean
    Graphics Option: fednode cannot clean an overlay bitmap, so it removes it (E.3.3 allows
    removal where cleaning is not possible).
    """
    opts = frozenset(options)
    if {Option.RETAIN_LONGITUDINAL_FULL_DATES, Option.RETAIN_LONGITUDINAL_MODIFIED_DATES} <= opts:
        raise ValueError("the Full Dates and Modified Dates options exclude each other")
    actions: dict[int, Action] = {}
    names: dict[int, str] = {}
    private_action = Action.REMOVE
    for row in load_table():
        chosen = row.basic
        option_actions = [row.options[o] for o in opts if o in row.options]
        if option_actions:
            chosen = "K" if "K" in option_actions else option_actions[0]
        if row.tag is None:
            if "GGGG" in row.pattern:
                private_action = resolve(chosen, None)
            continue
        actions[row.tag] = resolve(chosen, row.tag)
        names[row.tag] = (
            keyword_for_tag(row.tag)
            or row.name.replace(" ", "")
            or f"({row.tag >> 16:04X},{row.tag & 0xFFFF:04X})"
        )
    return Profile(
        options=opts,
        actions=actions,
        names=names,
        private_action=private_action,
        overlay_action=Action.REMOVE,
    )
