"""From a DICOM image to a normalised array: decode, Modality LUT, VOI LUT, polarity, resize.

The steps follow the DICOM grayscale pipeline (PS3.4 Annex N, "Grayscale Standard Display
Function" chain): stored values → Modality LUT (PS3.3 C.11.1) → VOI LUT or window (PS3.3
C.11.2) → polarity (MONOCHROME1 shows low values bright, PS3.3 C.7.6.3.1.2) → display values,
here scaled to ``[0, 1]``. Compressed pixel data is decoded by pydicom's pixel data handlers
(pylibjpeg for JPEG, JPEG-LS and JPEG 2000; RLE natively).
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

from plugins.base import PreprocessingError

logger = logging.getLogger(__name__)

ROBUST_PERCENTILES = (0.5, 99.5)
"""Window used when an image carries neither a VOI LUT nor a window (percentiles of its
values)."""


def decode_frame(ds: Dataset, frame: int = 0) -> tuple[np.ndarray, bool]:
    """Decode one frame of *ds*.

    Returns
    -------
    values : numpy.ndarray
        2-D stored values; for a colour image (RGB, or YBR that pydicom converts to RGB) the
        luminance (ITU-R BT.601 weights) instead.
    colour : bool
        Whether the image was colour.

    Raises
    ------
    PreprocessingError
        If the pixel data is missing or cannot be decoded (the message names the transfer
        syntax, never a header value).
    """
    if "PixelData" not in ds:
        raise PreprocessingError("the instance has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise PreprocessingError(f"frame {frame} requested of {frames}")
    try:
        arr = pixel_array(ds, index=frame if frames > 1 else None)
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise PreprocessingError(
            f"cannot decode the pixel data ({name}): {type(exc).__name__}"
        ) from exc
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:
        weights = np.array([0.299, 0.587, 0.114])
        return np.asarray(arr.astype(np.float64) @ weights), True
    if arr.ndim != 2:
        raise PreprocessingError(f"expected one 2-D frame, got an array of shape {arr.shape}")
    return arr, False


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Window *values* to ``[0, 1]`` (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    function = function.upper()
    if function == "SIGMOID":
        if width <= 0:
            raise PreprocessingError("SIGMOID window width must be > 0")
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise PreprocessingError("LINEAR_EXACT window width must be > 0")
        return np.asarray(np.clip((values - center) / width + 0.5, 0.0, 1.0))
    if width < 1:
        raise PreprocessingError("LINEAR window width must be >= 1")
    if width == 1:
        return np.asarray((values > center - 0.5).astype(np.float64))
    return np.asarray(np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0))


def _first_number(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def to_display(ds: Dataset, frame: int = 0) -> np.ndarray:
    """One frame of *ds* as display values in ``[0, 1]`` (white = 1).

    Grayscale: Modality LUT, then the VOI LUT Sequence if present (the first LUT), else the
    first window (Window Center/Width with VOI LUT Function), else the
    :data:`ROBUST_PERCENTILES` of the values; MONOCHROME1 is inverted. Colour: the luminance
    scaled by its largest possible value.

    Raises
    ------
    PreprocessingError
        If the pixel data cannot be decoded or the VOI attributes are unusable.
    """
    stored, colour = decode_frame(ds, frame)
    if colour:
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        return np.asarray(np.clip(stored / top, 0.0, 1.0), dtype=np.float64)
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut:
        try:
            # a LUT is indexed by integer values (PS3.3 C.11.2.1.1)
            indices = np.rint(values).astype(np.int64)
            mapped = np.asarray(
                apply_voi_lut(indices, ds, index=0, prefer_lut=True), dtype=np.float64
            )
            bits = int(voi_lut[0].LUTDescriptor[2])
        except Exception as exc:
            raise PreprocessingError(
                f"the VOI LUT cannot be applied: {type(exc).__name__}"
            ) from exc
        out = mapped / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first_number(ds.WindowCenter)
            width = _first_number(ds.WindowWidth)
        except (TypeError, ValueError, IndexError) as exc:
            raise PreprocessingError("the window center or width is not a number") from exc
        function = ds.get("VOILUTFunction") or "LINEAR"
        out = _window(values, center, width, str(function))
    else:
        lo, hi = np.percentile(values, ROBUST_PERCENTILES)
        out = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    out = np.clip(out, 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return np.asarray(out, dtype=np.float64)


def pad_to_square(image: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Pad *image* symmetrically to a square with *fill*, keeping the aspect ratio."""
    height, width = image.shape
    side = max(height, width)
    top = (side - height) // 2
    left = (side - width) // 2
    out = np.full((side, side), fill, dtype=image.dtype)
    out[top : top + height, left : left + width] = image
    return out


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """A ``(size_out, size_in)`` matrix averaging input cells over each output cell's span."""
    edges = np.linspace(0.0, size_in, size_out + 1)
    starts, ends = edges[:-1], edges[1:]
    cells = np.arange(size_in)
    overlap = np.clip(
        np.minimum(ends[:, None], cells[None, :] + 1) - np.maximum(starts[:, None], cells[None, :]),
        0.0,
        None,
    )
    return np.asarray(overlap / overlap.sum(axis=1, keepdims=True))


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D *image* by area averaging (anti-aliased when shrinking).

    Each output pixel is the mean of the input area it covers, including fractional overlap, so
    the mean intensity is preserved exactly.
    """
    rows = _area_weights(image.shape[0], height)
    cols = _area_weights(image.shape[1], width)
    return np.asarray(rows @ image.astype(np.float64) @ cols.T)


def normalise(
    display: np.ndarray, size: tuple[int, int], value_range: tuple[float, float] = (-1.0, 1.0)
) -> np.ndarray:
    """Pad *display* (values in ``[0, 1]``) to a square, resize it and map it to *value_range*.

    Returns
    -------
    numpy.ndarray
        ``float32`` of shape *size*.
    """
    lo, hi = value_range
    square = pad_to_square(display, 0.0)
    small = np.clip(resize_area(square, *size), 0.0, 1.0)
    return np.asarray(lo + (hi - lo) * small, dtype=np.float32)


def image_to_input(
    ds: Dataset,
    size: tuple[int, int],
    value_range: tuple[float, float] = (-1.0, 1.0),
    frame: int = 0,
) -> np.ndarray:
    """One frame of *ds* as a ``float32`` array of shape *size* with values in *value_range*."""
    return normalise(to_display(ds, frame), size, value_range)
