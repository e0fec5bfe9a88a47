"""Burned-in text: the admission gate and the pixel rules (PS3.15 E.1.1 note 5, E.3.1).

An instance may carry identifying text burned into its pixels when Burned In Annotation
(0028,0301) is ``YES``, or when it is absent and the modality or SOP Class commonly burns text in
(ultrasound, secondary capture, external-camera and endoscopy photographs, encapsulated
documents: :data:`DEFAULT_BURNED_IN_MODALITIES`, :data:`BURNED_IN_SOP_CLASSES`). Such an
instance is admitted only if a configured :class:`~node.config.PixelRule` matches its header
signature (Manufacturer, Model, Modality, Rows, Columns); the rule's rectangles are then set to
black in the stored pixel values of every frame (the Clean Pixel Data Option, code 113101).
Compressed pixel data is decoded with pydicom's pixel handlers and stored uncompressed (Explicit
VR Little Endian). Without a matching rule the instance is not admitted
(:class:`~node.errors.RejectedInstance`, with the reason).

"Black" is stored value 0 for every photometric interpretation except YBR (Y 0, Cb and Cr 128).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any

from node.config import DeidSection, PixelRule
from node.errors import RejectedInstance

if TYPE_CHECKING:
    from node.dicom.encoding import Element

logger = logging.getLogger(__name__)

DEFAULT_BURNED_IN_MODALITIES = ("US", "SC", "OT", "XC", "ES", "DOC")

SOP_CLASS_NAMES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.104.2": "Encapsulated CDA",
    "1.2.840.10008.5.1.4.1.1.104.3": "Encapsulated STL",
    "1.2.840.10008.5.1.4.1.1.104.4": "Encapsulated OBJ",
    "1.2.840.10008.5.1.4.1.1.104.5": "Encapsulated MTL",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image",
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image",
}
"""The SOP Classes whose instances are gated when Burned In Annotation is absent, by name."""

BURNED_IN_SOP_CLASSES: frozenset[str] = frozenset(SOP_CLASS_NAMES)
"""SOP Classes whose instances are gated when Burned In Annotation is absent."""

PIXEL_MODULE_TAGS: frozenset[int] = frozenset(
    {
        0x00280002, 0x00280004, 0x00280006, 0x00280008, 0x00280010, 0x00280011, 0x00280100,
        0x00280101, 0x00280102, 0x00280103, 0x00281101, 0x00281102, 0x00281103, 0x00281201,
        0x00281202, 0x00281203, 0x7FE00001, 0x7FE00002, 0x7FE00010,
    }
)
"""The Image Pixel module elements (PS3.3 C.7.6.3) the cleaner reads and may rewrite."""


@dataclass(frozen=True)
class Header:
    """The header facts the gate looks at (none of them identifies a patient)."""

    sop_class_uid: str
    modality: str
    burned_in: str | None
    """Burned In Annotation, upper case, or ``None`` when absent or empty."""
    manufacturer: str
    model: str
    rows: int | None
    columns: int | None
    has_pixels: bool


@dataclass(frozen=True)
class Decision:
    """What the gate decided for an admitted instance."""

    rule: PixelRule | None
    """The rule whose rectangles to black out, or ``None`` (nothing to clean)."""
    burned_in_out: str | None
    """The Burned In Annotation to write (``"NO"``), or ``None`` to leave it as it is."""


def _same(expected: str | None, actual: str) -> bool:
    return expected is None or expected.strip().lower() == actual.strip().lower()


def match_rule(rules: list[PixelRule], header: Header) -> PixelRule | None:
    """The first rule whose every set field matches *header*."""
    for rule in rules:
        if (
            _same(rule.manufacturer, header.manufacturer)
            and _same(rule.model, header.model)
            and _same(rule.modality, header.modality)
            and (rule.rows is None or rule.rows == header.rows)
            and (rule.columns is None or rule.columns == header.columns)
        ):
            return rule
    return None


def _printable(value: str) -> str:
    return "".join(c for c in value if c.isprintable())[:64]


def assess(header: Header, config: DeidSection) -> Decision:
    """Decide whether an instance is admitted, and with which pixel rule.

    Raises
    ------
    RejectedInstance
        If the instance may carry burned-in text and no rule can clean it. The reason names
        the modality, the equipment and the image size (none of which identifies a patient).
    """
    if header.burned_in == "YES":
        why = "Burned In Annotation is YES"
    elif header.burned_in is None and header.sop_class_uid in BURNED_IN_SOP_CLASSES:
        name = SOP_CLASS_NAMES.get(header.sop_class_uid, header.sop_class_uid)
        why = f"Burned In Annotation is absent and the SOP class is {name}"
    elif header.burned_in is None and header.modality in config.burned_in_modalities:
        why = (
            f"Burned In Annotation is absent and the modality {header.modality} is one of "
            "[deid] burned_in_modalities"
        )
    else:
        return Decision(None, "NO" if header.burned_in == "NO" else None)
    if not header.has_pixels:
        raise RejectedInstance(
            f"may hold identifying text ({why}) in content that no pixel rule can clean"
        )
    rule = match_rule(config.pixel_rules, header)
    if rule is None:
        raise RejectedInstance(
            f"possible burned-in annotation ({why}) and no pixel rule matches "
            f"(modality {header.modality or '-'}, manufacturer "
            f"'{_printable(header.manufacturer)}', model '{_printable(header.model)}', "
            f"{header.rows}x{header.columns})"
        )
    return Decision(rule, "NO")


def clean(
    buf: bytes, elements: list[Element], transfer_syntax: str, rule: PixelRule
) -> tuple[dict[int, bytes], set[int], str]:
    """Black out *rule*'s rectangles in every frame of the pixel data.

    Parameters
    ----------
    buf, elements
        The encoded dataset and its top-level Image Pixel module elements.
    transfer_syntax
        The dataset's transfer syntax.
    rule
        The matching rule.

    Returns
    -------
    changed, removed, syntax
        The re-encoded elements by tag, the tags to drop, and the output transfer syntax
        (Explicit VR Little Endian if the input was compressed, else unchanged).
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset
    from pydicom.filewriter import correct_ambiguous_vr, write_data_element
    from pydicom.pixels.utils import decompress
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = UID(transfer_syntax)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    raw = b"".join(buf[el.start : el.end] for el in elements)
    ds = read_dataset(BytesIO(raw), implicit, little)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    before = set(ds.keys())
    out_syntax = str(syntax)
    if syntax.is_compressed:
        try:
            decompress(ds, as_rgb=True, generate_instance_uid=False)
        except Exception as exc:  # any decoder failure: the pixels cannot be cleaned
            raise RejectedInstance(
                f"the compressed pixel data ({syntax.name}) cannot be decoded to clean it"
            ) from exc
        out_syntax = str(ExplicitVRLittleEndian)
    blacken(ds, rule.rectangles)
    correct_ambiguous_vr(ds, little)
    changed: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = little
        fp.is_implicit_VR = implicit
        write_data_element(fp, elem)
        changed[int(elem.tag)] = fp.getvalue()
    removed = {int(t) for t in before - set(ds.keys())}
    logger.debug("pixel rule %r applied to %d rectangle(s)", rule.name, len(rule.rectangles))
    return changed, removed, out_syntax


def blacken(ds: Any, rectangles: list[tuple[int, int, int, int]]) -> None:
    """Set *rectangles* to black in every frame of *ds*'s native (uncompressed) Pixel Data."""
    import numpy as np

    grid: Any
    pairs: Any
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.BitsAllocated)
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    data = bytearray(ds.PixelData)
    boxes = []
    for x, y, w, h in rectangles:
        x0, y0, x1, y1 = min(x, cols), min(y, rows), min(x + w, cols), min(y + h, rows)
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    ybr = photometric.startswith("YBR")
    fill = (0, 128, 128) if ybr else (0, 0, 0)
    if bits == 1:
        count = frames * rows * cols
        flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count]
        grid = flat.reshape(frames, rows, cols)
        for x0, y0, x1, y1 in boxes:
            grid[:, y0:y1, x0:x1] = 0
        packed = np.packbits(grid.ravel(), bitorder="little").tobytes()
        data[: len(packed)] = packed
    else:
        dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}.get(bits)
        if dtype is None:
            raise RejectedInstance(f"cannot clean pixel data with Bits Allocated {bits}")
        if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
            arr = np.frombuffer(data, dtype, count=frames * rows * cols * 2)
            pairs = arr.reshape(frames, rows, cols // 2, 4)
            for x0, y0, x1, y1 in boxes:
                pairs[:, y0:y1, x0 // 2 : (x1 + 1) // 2, 0:2] = 0
                pairs[:, y0:y1, x0 // 2 : (x1 + 1) // 2, 2:4] = 128
        elif spp == 1:
            arr = np.frombuffer(data, dtype, count=frames * rows * cols)
            grid = arr.reshape(frames, rows, cols)
            for x0, y0, x1, y1 in boxes:
                grid[:, y0:y1, x0:x1] = 0
        elif planar == 0:
            arr = np.frombuffer(data, dtype, count=frames * rows * cols * spp)
            grid = arr.reshape(frames, rows, cols, spp)
            for x0, y0, x1, y1 in boxes:
                for s in range(spp):
                    grid[:, y0:y1, x0:x1, s] = fill[s] if s < 3 else 0
        else:
            arr = np.frombuffer(data, dtype, count=frames * rows * cols * spp)
            grid = arr.reshape(frames, spp, rows, cols)
            for x0, y0, x1, y1 in boxes:
                for s in range(spp):
                    grid[:, s, y0:y1, x0:x1] = fill[s] if s < 3 else 0
    ds.PixelData = bytes(data)
