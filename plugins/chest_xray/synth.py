"""Synthetic chest radiographs: invented anatomy, an invented finding, complete DX/CR headers.

The image is drawn analytically in patient-normalised coordinates (so position, size and a
small rotation vary freely): soft tissue of the torso, two lung fields bounded below by the
hemidiaphragm domes, mediastinum and spine, a heart shadow (larger on AP views, as
magnification makes it), ribs, clavicles, vascular markings and quantum noise. A positive study
carries a pneumonia-like *consolidation*: one to three patchy, textured opacities confined to one
lung, mostly in the middle and lower zones. It is a learnable stand-in for a finding, not a
model of pneumonia.

About a third of the studies also hold a lateral view, which the task must not use. DX images
are stored MONOCHROME2 with 14 bits; CR images 12 bits, half of them MONOCHROME1 (stored
inverted), as CR readers often do.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from plugins.base import SyntheticStudy
from plugins.synthetic import (
    SYNTHETIC_COMMENT,
    FakeIdentity,
    add_equipment,
    add_patient_and_study,
    fake_identity,
)

CHEST = ("816094009", "SCT", "Chest")
VIEW_CODES = {
    "PA": ("272479007", "SCT", "postero-anterior"),
    "AP": ("399348003", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}


@dataclass(frozen=True)
class Pose:
    """Where and how large the patient is on the detector, and the view."""

    view: str
    shift_x: float
    shift_y: float
    scale: float
    angle: float
    exposure: float
    gamma: float


def _gauss_matrix(size: int, sigma: float) -> np.ndarray:
    """A ``(size, size)`` Gaussian smoothing matrix (rows sum to one, edges renormalised)."""
    idx = np.arange(size)
    weights = np.exp(-0.5 * ((idx[:, None] - idx[None, :]) / max(sigma, 1e-6)) ** 2)
    return np.asarray(weights / weights.sum(axis=1, keepdims=True))


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    g = _gauss_matrix(image.shape[0], sigma)
    return np.asarray(g @ image @ g.T)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance noise smoothed at *sigma* pixels."""
    field = _blur(rng.standard_normal((size, size)), sigma)
    return np.asarray((field - field.mean()) / (field.std() + 1e-12))


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """A soft mask from a signed value (> 0 inside) with an edge of width *edge*."""
    return np.asarray(0.5 + 0.5 * np.tanh(inside / (2.0 * edge)))


def _grid(size: int, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (x to the image right, y down, about -1..1 over the chest)."""
    axis = np.linspace(-1.0, 1.0, size)
    u, v = np.meshgrid(axis, axis)
    u = (u - pose.shift_x) / pose.scale
    v = (v - pose.shift_y) / pose.scale
    c, s = np.cos(pose.angle), np.sin(pose.angle)
    return c * u + s * v, -s * u + c * v


def _ridges(rng: np.random.Generator, size: int, sigma: float, width: float) -> np.ndarray:
    """Thin branching lines: where a smooth noise field crosses zero."""
    return np.asarray(np.exp(-((_smooth_noise(rng, size, sigma) / width) ** 2)))


def _torso(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-width margin of the neck, shoulders and trunk, and the tissue thickness profile."""
    shoulder = np.clip((y + 0.92) / 0.38, 0.0, 1.0)
    half_w = 0.17 + 0.72 * (3 * shoulder**2 - 2 * shoulder**3) + 0.03 * np.clip(y, 0.0, None)
    margin = half_w - np.abs(x)
    thickness = np.sqrt(np.clip(1.0 - (x / half_w) ** 2, 0.0, 1.0))
    return margin, thickness


def _lungs(
    x: np.ndarray, y: np.ndarray, edge: float, heart_scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft masks of the right lung (image left) and the left lung (image right), and of
    the heart shadow that shapes the left lung's medial border."""
    masks = []
    heart_bulge = 0.27 * heart_scale * np.exp(-(((y - 0.28) / (0.21 * heart_scale)) ** 2))
    for side, dome_peak in ((-1.0, 0.36), (1.0, 0.42)):
        sx = side * x
        grow = np.sqrt(np.clip((y + 0.74) / 1.15, 0.0, 1.0))
        lateral = 0.26 + 0.52 * grow - sx
        bulge = heart_bulge if side > 0 else 0.3 * heart_bulge
        medial = sx - (0.09 + bulge)
        apex = y + 0.74 - 0.5 * ((sx - 0.34) / 0.3) ** 2
        dome = dome_peak + 0.28 * ((sx - 0.45) / 0.35) ** 2 - y
        inside = np.minimum(np.minimum(lateral, medial), np.minimum(apex, dome))
        masks.append(_soft(inside, edge))
    heart = _soft(heart_bulge + 0.12 - np.abs(x - 0.05), edge) * _soft(0.55 - y, edge)
    return masks[0], masks[1], heart * _soft(y + 0.05, edge)


def _frontal(
    rng: np.random.Generator, size: int, pose: Pose, finding: bool
) -> tuple[np.ndarray, dict[str, float]]:
    x, y = _grid(size, pose)
    edge = 1.5 * 2.0 / size / pose.scale  # about 1.5 pixels
    margin, thickness = _torso(x, y)
    body = _soft(margin, edge * 2)
    img = 0.03 + 0.50 * body * (0.35 + 0.65 * thickness)
    heart_scale = 1.12 if pose.view == "AP" else 1.0
    right, left, heart = _lungs(x, y, edge, heart_scale)
    lungs = np.clip(right + left, 0.0, 1.0)
    # air: deepest in the middle of each lung, thinner at the apices and the periphery
    depth = 0.30 + 0.10 * np.clip((y + 0.6) / 1.0, 0.0, 1.0)
    img -= depth * lungs * (0.75 + 0.25 * thickness)
    img += 0.04 * heart
    # gastric bubble under the left hemidiaphragm
    bubble = 1.0 - ((x - 0.42) / 0.12) ** 2 - ((y - 0.58) / 0.06) ** 2
    img -= 0.05 * _soft(bubble, edge * 3) * body
    # vessels: branching lines, densest near the hila
    hila = np.exp(-(((np.abs(x) - 0.2) / 0.22) ** 2) - ((y - 0.05) / 0.3) ** 2)
    vessels = _ridges(rng, size, size / 90.0, 0.18)
    img += 0.06 * lungs * vessels * (0.25 + hila)
    # spine (faint through the mediastinum) and clavicles
    img += 0.035 * _soft(0.065 - np.abs(x), edge) * body * _soft(y + 0.75, edge * 8)
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y + 1.0) / 0.15)
    img += 0.02 * _soft(0.05 - np.abs(x), edge) * vertebrae * body
    bones = np.zeros_like(img)
    for side in (-1.0, 1.0):
        sx = side * x
        line = -0.66 - 0.14 * (sx - 0.08) + 0.1 * (sx - 0.35) ** 2
        bones += (
            np.exp(-(((y - line) / 0.028) ** 2))
            * _soft(sx - 0.07, edge)
            * _soft(0.62 - sx, edge * 4)
        )
    # ribs: posterior arcs rising from the spine, then curving down laterally;
    # anterior arcs, fainter, descending towards the sternum
    for k in range(10):
        s = np.abs(x) - 0.07
        posterior = -0.72 + k * 0.118 - 0.15 * s + 0.6 * s**2
        bones += 0.8 * np.exp(-(((y - posterior) / 0.024) ** 2)) * (s > 0) * _soft(margin, edge)
        anterior = -0.58 + k * 0.1 + 0.35 * (0.75 - s) ** 2 - 0.1
        bones += 0.35 * np.exp(-(((y - anterior) / 0.03) ** 2)) * (s > 0.15) * lungs
    img += 0.07 * np.clip(bones, 0.0, 1.5) * body
    meta: dict[str, float] = {"lesions": 0.0, "lesion_radius": 0.0}
    if finding:
        lung = right if rng.random() < 0.5 else left
        side = -1.0 if lung is right else 1.0
        n = int(rng.integers(1, 4))
        texture = 0.65 + 0.35 * np.clip(_smooth_noise(rng, size, size / 70.0), -1.5, 1.5)
        bronchograms = _ridges(rng, size, size / 50.0, 0.12)
        opacity = np.zeros_like(img)
        radius = 0.0
        for _ in range(n):
            cx = side * rng.uniform(0.25, 0.5)
            cy = rng.uniform(-0.2, 0.3)
            radius = rng.uniform(0.10, 0.20)
            opacity += np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
        opacity = np.clip(opacity, 0.0, 1.0) * lung * texture * (1.0 - 0.4 * bronchograms)
        img += rng.uniform(0.18, 0.28) * opacity
        meta = {"lesions": float(n), "lesion_radius": float(radius)}
    return img, meta


def _lateral(rng: np.random.Generator, size: int, pose: Pose) -> np.ndarray:
    x, y = _grid(size, pose)
    edge = 3.0 / size / pose.scale
    shoulder = np.clip((y + 0.95) / 0.3, 0.0, 1.0)
    half_w = 0.25 + 0.4 * shoulder
    margin = half_w - np.abs(x - 0.05)
    thickness = np.sqrt(np.clip(1.0 - ((x - 0.05) / half_w) ** 2, 0.0, 1.0))
    body = _soft(margin, edge * 2)
    img = 0.03 + 0.55 * body * (0.5 + 0.5 * thickness)
    lung = 1.0 - ((x - 0.08) / 0.48) ** 2 - ((y + 0.02) / 0.62) ** 2
    dome = 0.42 + 0.3 * (x - 0.1) ** 2 - y
    heart = 1.0 - ((x + 0.2) / 0.3) ** 2 - ((y - 0.28) / 0.26) ** 2
    air = _soft(np.minimum(lung, dome), edge) * (1.0 - _soft(heart, edge))
    img -= 0.32 * air
    img += 0.10 * _soft(0.08 - np.abs(x - 0.52), edge) * body  # spine, posterior
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y + 1.0) / 0.15)
    img += 0.03 * _soft(0.07 - np.abs(x - 0.52), edge) * vertebrae
    img += 0.06 * _soft(0.025 - np.abs(x + 0.55), edge) * _soft(0.2 - np.abs(y + 0.2), edge)
    img += 0.05 * air * _ridges(rng, size, size / 90.0, 0.18)
    return np.asarray(img)


def _expose(rng: np.random.Generator, img: np.ndarray, pose: Pose) -> np.ndarray:
    """Detector response: blur, gain, gamma and quantum noise; values in ``[0, 1]``."""
    size = img.shape[0]
    img = _blur(img, size / 400.0)
    img = np.clip(img * pose.exposure, 0.0, None)
    img = img**pose.gamma
    img += rng.normal(0.0, 0.008, img.shape)
    return np.asarray(np.clip(img / max(float(np.percentile(img, 99.9)), 1e-6), 0.0, 1.0))


def _pose(rng: np.random.Generator, view: str) -> Pose:
    return Pose(
        view=view,
        shift_x=rng.uniform(-0.06, 0.06),
        shift_y=rng.uniform(-0.04, 0.08),
        scale=rng.uniform(0.82, 0.98),
        angle=np.deg2rad(rng.uniform(-4.0, 4.0)),
        exposure=rng.uniform(0.85, 1.15),
        gamma=rng.uniform(0.85, 1.15),
    )


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _image_dataset(
    who: FakeIdentity,
    pixels: np.ndarray,
    *,
    modality: str,
    view: str,
    monochrome1: bool,
    series_uid: str,
    series_number: int,
    study_description: str,
    uid_seed: list[str],
) -> Dataset:
    """A complete DX (for presentation) or CR image with the values of *who*."""
    dx = modality == "DX"
    bits = 14 if dx else 12
    top = 2**bits - 1
    stored = np.round(pixels * top).astype(np.uint16)
    if monochrome1:
        stored = (top - stored).astype(np.uint16)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = (
        DigitalXRayImageStorageForPresentation if dx else ComputedRadiographyImageStorage
    )
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*uid_seed, "sop"])
    ds.InstanceCreationDate = who.study_date
    ds.InstanceCreationTime = who.study_time
    add_patient_and_study(ds, who, study_description)
    # General / DX / CR Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = who.study_date
    ds.SeriesTime = who.study_time
    ds.SeriesDescription = f"SYNTHETIC CHEST {view}"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
    add_equipment(ds, modality, 1 if dx else 2)
    # General Image / General Acquisition
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "F"] if view == "LL" else ["L", "F"]
    ds.ContentDate = ds.AcquisitionDate = who.study_date
    ds.ContentTime = ds.AcquisitionTime = who.study_time
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = SYNTHETIC_COMMENT
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    # X-ray acquisition facts
    ds.KVP = 120 if view != "LL" else 125
    ds.ExposureTime = 8
    ds.XRayTubeCurrent = 250
    ds.DistanceSourceToDetector = 1800 if view == "PA" else 1000
    spacing = 430.0 / stored.shape[0]  # a 43 cm detector
    ds.ImagerPixelSpacing = [round(spacing, 6), round(spacing, 6)]
    if dx:
        # DX Anatomy Imaged, DX Image, DX Detector, DX Positioning, Acquisition Context
        ds.ImageLaterality = "U"
        ds.AnatomicRegionSequence = Sequence([_code(CHEST)])
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PositionerType = "COLUMN"
        ds.ViewCodeSequence = Sequence([_code(VIEW_CODES[view])])
        ds.AcquisitionContextSequence = Sequence()
    else:
        ds.PlateID = "SYN-PLATE-1"
    low, high = np.percentile(stored, [1.0, 99.5])
    ds.WindowCenter = round(float(low + high) / 2.0, 1)
    ds.WindowWidth = round(max(float(high - low), 2.0), 1)
    ds.VOILUTFunction = "LINEAR"
    ds.WindowCenterWidthExplanation = "SYNTHETIC DEFAULT"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def synthesize_image(
    rng: np.random.Generator, size: int, *, view: str, finding: bool
) -> tuple[np.ndarray, dict[str, float]]:
    """One synthetic radiograph of *view* (``PA``, ``AP`` or ``LL``), values in ``[0, 1]``.

    White is 1 (high attenuation), as displayed. A frontal view with *finding* carries a
    consolidation; returns the image and facts about the finding.
    """
    pose = _pose(rng, view)
    if view == "LL":
        return _expose(rng, _lateral(rng, size, pose), pose), {}
    img, meta = _frontal(rng, size, pose, finding)
    return _expose(rng, img, pose), meta


def synthetic_studies(
    count: int,
    *,
    seed: int,
    image_size: int,
    positive_label: str,
    negative_label: str,
    prevalence: float = 0.5,
    lateral_fraction: float = 0.3,
) -> Iterator[SyntheticStudy]:
    """Generate *count* synthetic chest studies, reproducibly from *seed*."""
    if image_size < 64:
        raise ValueError("synthetic chest radiographs need an image size of at least 64")
    master = np.random.default_rng(seed)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        who = fake_identity(rng, index, seed)
        positive = bool(master.random() < prevalence)
        modality = "DX" if rng.random() < 0.5 else "CR"
        frontal = "PA" if rng.random() < 0.7 else "AP"
        monochrome1 = modality == "CR" and rng.random() < 0.5
        views = [frontal] + (["LL"] if rng.random() < lateral_fraction else [])
        series_uid = generate_uid(entropy_srcs=["fednode-synth", str(seed), str(index), "series"])
        datasets = []
        facts: dict[str, float | str] = {"modality": modality, "view": frontal}
        for number, view in enumerate(views, start=1):
            pixels, meta = synthesize_image(rng, image_size, view=view, finding=positive)
            if view != "LL":
                facts.update(meta)
            ds = _image_dataset(
                who,
                pixels,
                modality=modality,
                view=view,
                monochrome1=monochrome1,
                series_uid=series_uid
                if number == 1
                else generate_uid(
                    entropy_srcs=["fednode-synth", str(seed), str(index), "series", view]
                ),
                series_number=number,
                study_description=f"XR CHEST {'2 VIEWS' if len(views) > 1 else frontal}",
                uid_seed=["fednode-synth", str(seed), str(index), view],
            )
            ds.InstanceCreationTime = (
                dt.datetime.strptime(who.study_time, "%H%M%S") + dt.timedelta(minutes=number)
            ).strftime("%H%M%S")
            datasets.append(ds)
        yield SyntheticStudy(
            datasets=tuple(datasets),
            label=positive_label if positive else negative_label,
            study_instance_uid=who.study_instance_uid,
            accession_number=who.accession_number,
            meta=facts,
        )
