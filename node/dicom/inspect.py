"""Check a received dataset's encoding and read the four UIDs the node files it under.

The SCP must answer a failure for a dataset it cannot decode *before* acknowledging it, but it
must not pay for a full pydicom parse of every instance. :func:`inspect_dataset` walks the
element structure of the encoded bytes (PS3.5 Section 7: tag, VR, length; sequences and
encapsulated pixel data item by item) without converting any value, checks that every length
fits and the dataset ends exactly at the last element, and decodes only the SOP Class, SOP
Instance, Study Instance and Series Instance UIDs of the top level.
"""

from __future__ import annotations

import functools
import struct
import zlib
from dataclasses import dataclass

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xE000, 0xE00D, 0xE0DD
_PIXEL_DATA = 0x7FE00010

SOP_CLASS, SOP_INSTANCE, STUDY, SERIES = 0x00080016, 0x00080018, 0x0020000D, 0x0020000E
_WANTED = (SOP_CLASS, SOP_INSTANCE, STUDY, SERIES)
_MAX_DEPTH = 64


class MalformedDataset(ValueError):
    """The dataset's encoding is invalid; the message says where (tags only, never values)."""


@dataclass(frozen=True)
class DatasetHeader:
    """The identifiers a received instance is filed under (originals: PHI, never persisted)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


def inspect_dataset(
    raw: bytes | bytearray | memoryview, transfer_syntax: str
) -> tuple[DatasetHeader | None, list[str]]:
    """Validate the encoding of *raw* (a dataset without File Meta) in *transfer_syntax*.

    Returns
    -------
    header, missing
        The header if all four UIDs are present, else ``None`` and the missing keywords.

    Raises
    ------
    MalformedDataset
        If the bytes are not a well-formed dataset in that transfer syntax.
    """
    explicit, little, deflated = _encoding(transfer_syntax)
    data = raw
    if deflated:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            data = inflater.decompress(raw) + inflater.flush()
        except zlib.error as exc:
            raise MalformedDataset("the deflated dataset cannot be inflated") from exc
    if not data:
        raise MalformedDataset("the dataset is empty")
    walker = _Walker(memoryview(data), explicit, little)
    found: dict[int, str] = {}
    pos, stop = walker.elements(0, len(data), 0, found)
    if stop is not None or pos != len(data):
        raise MalformedDataset("the dataset has a stray delimiter at the top level")
    names = {SOP_CLASS: "SOPClassUID", SOP_INSTANCE: "SOPInstanceUID",
             STUDY: "StudyInstanceUID", SERIES: "SeriesInstanceUID"}
    missing = [names[t] for t in _WANTED if not found.get(t)]
    if missing:
        return None, missing
    return DatasetHeader(found[SOP_CLASS], found[SOP_INSTANCE], found[STUDY], found[SERIES]), []


@functools.lru_cache(maxsize=64)
def _encoding(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """(explicit VR, little endian, deflated) of a transfer syntax, once per syntax (pydicom
    validates a UID each time one is made)."""
    ts = UID(transfer_syntax)
    return not ts.is_implicit_VR, ts.is_little_endian, ts == DeflatedExplicitVRLittleEndian


class _Walker:
    def __init__(self, buf: memoryview, explicit: bool, little: bool) -> None:
        self.buf = buf
        self.explicit = explicit
        end = "<" if little else ">"
        self.hh = struct.Struct(end + "HH")
        self.h = struct.Struct(end + "H")
        self.i = struct.Struct(end + "I")

    def elements(
        self, pos: int, end: int, depth: int, found: dict[int, str] | None,
        explicit: bool | None = None,
    ) -> tuple[int, int | None]:
        """Walk elements from *pos* to *end*; stop at an item delimiter (returned as 2nd)."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nest too deeply")
        buf, hh, i32 = self.buf, self.hh, self.i
        exp = self.explicit if explicit is None else explicit
        while pos < end:
            if pos + 8 > end:
                raise MalformedDataset("the dataset is truncated inside an element header")
            group, elem = hh.unpack_from(buf, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if elem in (_ITEM_END, _SEQ_END):
                    return pos + 8, elem
                raise MalformedDataset(f"unexpected item tag at ({group:04X},{elem:04X})")
            vr = b""
            if exp:
                vr = bytes(buf[pos + 4 : pos + 6])
                if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                    raise MalformedDataset(f"element ({group:04X},{elem:04X}) has an invalid VR")
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise MalformedDataset("the dataset is truncated inside an element header")
                    length = i32.unpack_from(buf, pos + 8)[0]
                    start = pos + 12
                else:
                    length = self.h.unpack_from(buf, pos + 6)[0]
                    start = pos + 8
            else:
                length = i32.unpack_from(buf, pos + 4)[0]
                start = pos + 8
            if length == _UNDEFINED:
                if exp and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                    raise MalformedDataset(
                        f"element ({group:04X},{elem:04X}) has undefined length but VR {vr!r}"
                    )
                # PS3.5 6.2.2: an undefined-length UN holds implicit VR little endian items.
                inner = False if vr == b"UN" else exp
                pos = self.items(start, end, depth + 1, tag == _PIXEL_DATA, inner)
                continue
            stop = start + length
            if stop > end:
                raise MalformedDataset(f"element ({group:04X},{elem:04X}) is truncated")
            if found is not None and tag in _WANTED:
                found[tag] = bytes(buf[start:stop]).decode("ascii", "replace").strip("\x00 ")
            pos = stop
        return pos, None

    def items(self, pos: int, end: int, depth: int, encapsulated: bool, explicit: bool) -> int:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        buf, hh, i32 = self.buf, self.hh, self.i
        while True:
            if pos + 8 > end:
                raise MalformedDataset("the dataset is truncated inside a sequence")
            group, elem = hh.unpack_from(buf, pos)
            length = i32.unpack_from(buf, pos + 4)[0]
            if group != 0xFFFE:
                raise MalformedDataset(f"expected an item, found ({group:04X},{elem:04X})")
            if elem == _SEQ_END:
                return pos + 8
            if elem != _ITEM:
                raise MalformedDataset(f"unexpected delimiter ({group:04X},{elem:04X})")
            if length == _UNDEFINED:
                if encapsulated:
                    raise MalformedDataset("an encapsulated fragment has undefined length")
                pos, stop = self.elements(pos + 8, end, depth, None, explicit)
                if stop != _ITEM_END:
                    raise MalformedDataset("the dataset is truncated inside a sequence item")
            else:
                if pos + 8 + length > end:
                    raise MalformedDataset("a sequence item or fragment is truncated")
                pos += 8 + length
