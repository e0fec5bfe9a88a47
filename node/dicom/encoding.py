"""Encoded DICOM datasets: walk, check, split and repair them without decoding values (PS3.5,
PS3.10). The one walker of encoded DICOM in the node.

:func:`parse` walks the encoded bytes of a dataset (PS3.5 Section 7: tag, VR, length; sequences
item by item, defined or undefined length; encapsulated pixel data fragment by fragment) into
:class:`Element` records that say where each element and its value sit in the buffer. Nothing
is converted: the de-identification engine copies kept elements as slices. An explicit VR ``UN``
element that the data dictionary knows as a sequence, and an implicit VR element of unknown VR
whose value starts with an item, are parsed as sequences encoded in Implicit VR Little Endian
(PS3.5 6.2.2).

:func:`check` is the same walk without building the records: the SCP runs it on every received
dataset before acknowledging it (:mod:`node.dicom.inspect`), so a dataset is acknowledged only
if the de-identifier's own walk accepts it (every item of every sequence, the same depth limit
:data:`MAX_DEPTH`).

The transfer syntax and VR constants here are the node's only copy.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Final

from pydicom._dicom_dict import DicomDictionary
from pydicom.datadict import dictionary_VR

from node.errors import InstanceTooLarge, MalformedDataset

logger = logging.getLogger(__name__)

__all__ = [
    "DEFLATED_LE",
    "EXPLICIT_BE",
    "EXPLICIT_LE",
    "IMPLICIT_LE",
    "LONG_VRS",
    "MAX_DEPTH",
    "Element",
    "InstanceTooLarge",
    "MalformedDataset",
    "check",
    "dictionary_vr",
    "inflate",
    "normalize",
    "parse",
    "split_part10",
    "wrap",
]

IMPLICIT_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"

LONG_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
"""VRs with a reserved field and a 32-bit length in explicit VR encodings (PS3.5 7.1.2)."""
_LONG_VRS_BYTES = frozenset(vr.encode() for vr in LONG_VRS)
_VALID_VRS = frozenset(
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    "UN UR US UT UV".split()
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
MAX_DEPTH: Final = 64
"""How deep sequence items may nest (the receive check and the de-identifier alike)."""


# --------------------------------------------------------------------------------------------
# Parsing


@dataclass(slots=True)
class Element:
    """One encoded element: where it sits in the buffer, and its items if it is a sequence.

    ``start``/``end`` bound the whole element, ``vstart``/``vend`` its value; ``implicit``
    says whether it is encoded in Implicit VR (a UN sequence inside an explicit dataset is).
    """

    tag: int
    vr: str
    start: int
    vstart: int
    vend: int
    end: int
    items: list[list[Element]] | None
    implicit: bool


_VR_CACHE: dict[int, str] = {}


def dictionary_vr(tag: int) -> str:
    """The VR the data dictionary gives *tag* (``UN`` if unknown or private)."""
    vr = _VR_CACHE.get(tag)
    if vr is None:
        entry = DicomDictionary.get(tag)
        if entry is not None:
            vr = entry[0]
        elif tag >> 16 & 1:
            vr = "UN"
        else:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if len(_VR_CACHE) < 100_000:
            _VR_CACHE[tag] = vr
    return vr


class _Parser:
    """Walks encoded bytes into :class:`Element` trees (PS3.5 7.1, 7.5, 6.2.2).

    With *build* false (:func:`check`) the walk is the same, element for element and with the
    same errors, but records nothing except the top-level values of the tags in *wanted*.
    """

    def __init__(
        self,
        buf: bytes | bytearray | memoryview,
        little: bool,
        *,
        build: bool = True,
        wanted: frozenset[int] = frozenset(),
    ) -> None:
        self.buf = buf
        self.little = little
        self.build = build
        self.wanted = wanted
        self.found: dict[int, bytes] = {}
        e = "<" if little else ">"
        self.tag_len = struct.Struct(e + "HHL")
        self.tag_vr_short = struct.Struct(e + "HH2sH")
        self.long_len = struct.Struct(e + "L")
        self.le_tag_len = struct.Struct("<HHL")

    def dataset(
        self, pos: int, end: int, implicit: bool, depth: int = 0, in_item: bool = False
    ) -> tuple[list[Element], int]:
        """Parse elements from *pos* up to *end* (or an item delimiter when *in_item*)."""
        if depth > MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        buf = self.buf
        build = self.build
        wanted = self.wanted if depth == 0 else ()
        out: list[Element] = []
        little = self.little or implicit
        tag_len = self.le_tag_len if implicit else self.tag_len
        while pos < end:
            if pos + 8 > end:
                raise MalformedDataset(f"truncated element header at offset {pos}")
            if implicit:
                group, elem, length = tag_len.unpack_from(buf, pos)
                tag = group << 16 | elem
                if tag == _ITEM_END and in_item:
                    return out, pos + 8
                vr = dictionary_vr(tag) if group != 0xFFFE else "NONE"
                vstart = pos + 8
            else:
                group, elem, vrb, short = self.tag_vr_short.unpack_from(buf, pos)
                tag = group << 16 | elem
                if group == 0xFFFE:
                    if tag == _ITEM_END and in_item:
                        return out, pos + 8
                    raise MalformedDataset(f"unexpected delimiter at offset {pos}")
                vr = _VR_NAMES.get(vrb, "??")
                if vr not in _VALID_VRS:
                    raise MalformedDataset(f"invalid VR at offset {pos + 4}")
                if vrb in _LONG_VRS_BYTES:
                    if pos + 12 > end:
                        raise MalformedDataset(f"truncated element header at offset {pos}")
                    length = self.long_len.unpack_from(buf, pos + 8)[0]
                    vstart = pos + 12
                else:
                    length = short
                    vstart = pos + 8
            if group == 0xFFFE:
                raise MalformedDataset(f"unexpected delimiter at offset {pos}")
            items: list[list[Element]] | None = None
            if length == _UNDEFINED:
                if vr == "SQ":
                    items, stop = self.items(vstart, None, implicit, depth)
                elif vr == "UN":  # PS3.5 6.2.2: a sequence of unknown VR, as implicit VR LE
                    items, stop = self.items(vstart, None, True, depth)
                    vr = "SQ"
                elif tag == 0x7FE00010 or vr in ("OB", "OW", "OB or OW"):
                    stop = self.encapsulated(vstart)
                else:
                    raise MalformedDataset(f"undefined length on a {vr} element at offset {pos}")
                if build:
                    out.append(Element(tag, vr, pos, vstart, stop - 8, stop, items, implicit))
                pos = stop
                continue
            vend = vstart + length
            if vend > end:
                raise MalformedDataset(f"element at offset {pos} runs past the end of its data")
            if vr == "SQ":
                items, _ = self.items(vstart, vend, implicit, depth)
            elif vr == "UN" and length >= 8 and not implicit:
                if dictionary_vr(tag) == "SQ" and little:
                    items, _ = self.items(vstart, vend, True, depth)
                    vr = "SQ"
            elif implicit and vr == "UN" and length >= 8 and little:
                g, e = struct.unpack_from("<HH", buf, vstart)
                if g == 0xFFFE and e == 0xE000:
                    try:
                        items, _ = self.items(vstart, vend, True, depth)
                        vr = "SQ"
                    except MalformedDataset:
                        items = None
            if build:
                out.append(Element(tag, vr, pos, vstart, vend, vend, items, implicit))
            elif tag in wanted:
                self.found[tag] = bytes(buf[vstart:vend])
            pos = vend
        if in_item:
            if end == len(buf) or pos > end:
                raise MalformedDataset("item without an item delimiter")
        if pos != end:
            raise MalformedDataset("dataset does not end on an element boundary")
        return out, pos

    def items(
        self, pos: int, end: int | None, implicit: bool, depth: int
    ) -> tuple[list[list[Element]], int]:
        """Parse the items of a sequence value; return them and where the value ends."""
        buf = self.buf
        size = len(buf)
        limit = size if end is None else end
        tag_len = self.le_tag_len if implicit else self.tag_len
        items: list[list[Element]] = []
        while True:
            if end is not None and pos == end:
                return items, pos
            if pos + 8 > limit:
                raise MalformedDataset(f"truncated sequence at offset {pos}")
            group, elem, length = tag_len.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == _SEQ_END:
                if end is not None:
                    raise MalformedDataset(f"sequence delimiter in a defined length at {pos}")
                return items, pos + 8
            if tag != _ITEM:
                raise MalformedDataset(f"expected an item at offset {pos}")
            if length == _UNDEFINED:
                elems, pos = self.dataset(pos + 8, limit, implicit, depth + 1, in_item=True)
            else:
                stop = pos + 8 + length
                if stop > limit:
                    raise MalformedDataset(f"item at offset {pos} runs past its sequence")
                elems, _ = self.dataset(pos + 8, stop, implicit, depth + 1)
                pos = stop
            items.append(elems)

    def encapsulated(self, pos: int) -> int:
        """Skip the fragments of encapsulated pixel data (PS3.5 A.4); return the end."""
        buf = self.buf
        size = len(buf)
        while True:
            if pos + 8 > size:
                raise MalformedDataset(f"truncated encapsulated pixel data at offset {pos}")
            group, elem, length = self.tag_len.unpack_from(buf, pos)
            tag = group << 16 | elem
            if tag == _SEQ_END:
                return pos + 8
            if tag != _ITEM or length == _UNDEFINED:
                raise MalformedDataset(f"expected a pixel data fragment at offset {pos}")
            pos += 8 + length
            if pos > size:
                raise MalformedDataset("pixel data fragment runs past the end of the data")


_VR_NAMES: dict[bytes, str] = {vr.encode(): vr for vr in _VALID_VRS}


def parse(buf: bytes, transfer_syntax: str) -> list[Element]:
    """Parse a dataset (no preamble, no File Meta) encoded in *transfer_syntax*.

    Raises
    ------
    MalformedDataset
        If the bytes are not a well-formed dataset in that transfer syntax (the message names
        offsets, never values).
    """
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    elems, _ = _Parser(buf, little).dataset(0, len(buf), implicit)
    return elems


def check(
    buf: bytes | bytearray | memoryview, transfer_syntax: str, wanted: frozenset[int]
) -> dict[int, bytes]:
    """Walk a dataset as :func:`parse` does (same rules, same errors) without building it;
    return the raw values of the top-level elements whose tags are in *wanted*.

    *transfer_syntax* must not be deflated (:func:`inflate` first).
    """
    implicit = transfer_syntax == IMPLICIT_LE
    little = transfer_syntax != EXPLICIT_BE
    parser = _Parser(buf, little, build=False, wanted=wanted)
    parser.dataset(0, len(buf), implicit)
    return parser.found


# --------------------------------------------------------------------------------------------
# Part 10 files


def split_part10(data: bytes) -> tuple[bytes, str]:
    """Split a DICOM file into its dataset bytes and transfer syntax (PS3.10 7.1).

    Accepts a file with preamble and ``DICM``, a File Meta group without preamble, or a bare
    dataset (Implicit or Explicit VR Little Endian guessed from the first element). A
    deflated dataset is inflated (the returned syntax is then Explicit VR Little Endian).
    """
    pos = 132 if data[128:132] == b"DICM" else 0
    syntax: str | None = None
    if data[pos : pos + 2] == b"\x02\x00":
        while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
            elem = struct.unpack_from("<H", data, pos + 2)[0]
            vr = data[pos + 4 : pos + 6]
            if vr in _LONG_VRS_BYTES:
                length = struct.unpack_from("<L", data, pos + 8)[0]
                vstart = pos + 12
            elif vr.isalpha() and vr.isupper():
                length = struct.unpack_from("<H", data, pos + 6)[0]
                vstart = pos + 8
            else:  # an implicit VR File Meta (not conformant, but seen)
                length = struct.unpack_from("<L", data, pos + 4)[0]
                vstart = pos + 8
            if elem == 0x0010:
                syntax = data[vstart : vstart + length].rstrip(b"\x00 ").decode("ascii", "replace")
            pos = vstart + length
    elif pos == 132:
        raise MalformedDataset("the file has a DICM prefix but no File Meta Information")
    body = data[pos:]
    if syntax is None:
        syntax = EXPLICIT_LE if body[4:6].isalpha() and body[4:6].isupper() else IMPLICIT_LE
    if syntax == DEFLATED_LE:
        return inflate(body), EXPLICIT_LE
    return body, syntax


def normalize(data: bytes) -> tuple[bytes, str]:
    """Read *data* leniently with pydicom and write its dataset back well-formed.

    Little endian uncompressed syntaxes become Explicit VR Little Endian; big endian and
    compressed syntaxes keep their encoding.
    """
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
            syntax = syntax or (IMPLICIT_LE if ds.original_encoding[0] else EXPLICIT_LE)
            if syntax in (IMPLICIT_LE, DEFLATED_LE):
                syntax = EXPLICIT_LE
            fp = DicomBytesIO()
            fp.is_little_endian = syntax != EXPLICIT_BE
            fp.is_implicit_VR = False
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            for _ in ds.iterall():  # convert raw elements so that each has its VR
                pass
            write_dataset(fp, ds)
    except Exception as exc:  # pydicom cannot read or re-encode it either
        raise MalformedDataset(
            f"the dataset cannot be read even leniently ({type(exc).__name__})"
        ) from exc
    return fp.getvalue(), syntax


def wrap(raw: bytes, syntax: str) -> bytes:
    """A minimal Part 10 file around a bare dataset (for pydicom's lenient reader)."""
    uid = syntax.encode("ascii", "replace")
    if len(uid) & 1:
        uid += b"\x00"
    ts = struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(uid)) + uid
    length = struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(ts))
    return b"\x00" * 128 + b"DICM" + length + ts + raw


def inflate(body: bytes | bytearray | memoryview, limit: int | None = None) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (PS3.5 A.5, RFC 1951).

    With *limit*, never produce more than *limit* bytes: a dataset that would inflate beyond
    it raises :class:`InstanceTooLarge` (a deflate bomb is refused, not inflated).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        if limit is None:
            return inflater.decompress(body) + inflater.flush()
        out = inflater.decompress(body, limit + 1)
        if len(out) <= limit and not inflater.unconsumed_tail:
            out += inflater.flush()
        if len(out) > limit or inflater.unconsumed_tail:
            raise InstanceTooLarge(f"the deflated dataset inflates beyond {limit} bytes")
        return out
    except zlib.error as exc:
        raise MalformedDataset("the deflated dataset cannot be inflated") from exc
