"""The reference task: frontal chest radiographs (DX/CR, PA/AP) → probability of pneumonia."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
)

from plugins.base import (
    CodedConcept,
    HEEncoding,
    PreprocessingError,
    SyntheticStudy,
    TaskClass,
    TaskPlugin,
)
from plugins.imaging import image_to_input

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

PNEUMONIA = CodedConcept("233604007", "SCT", "Pneumonia")
ABSENT = CodedConcept("272519000", "SCT", "Absent")
PRESENT = CodedConcept("52101004", "SCT", "Present")

SOP_CLASSES = frozenset({ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation})
"""CR Image Storage and Digital X-Ray Image Storage - For Presentation (PS3.4 B.5). "For
processing" DX images are raw detector data and are not accepted."""
MODALITIES = frozenset({"CR", "DX"})
BODY_PARTS = frozenset({"CHEST", "THORAX"})
CHEST_CODES = frozenset({"816094009", "43799004", "51185008"})
"""SNOMED CT codes of the chest/thorax in Anatomic Region Sequence (CID 4009)."""
FRONTAL_VIEWS = ("PA", "AP")
VIEW_CODES = {"272479007": "PA", "399348003": "AP"}
"""SNOMED CT view codes (CID 4010 "DX View") of the frontal views."""

SIZE = 64


def _code_values(header: Dataset, keyword: str) -> set[str]:
    return {str(item.get("CodeValue", "")) for item in header.get(keyword, []) or []}


def view_of(header: Dataset) -> str | None:
    """``"PA"`` or ``"AP"`` for a frontal view, from View Position or View Code Sequence."""
    position = str(header.get("ViewPosition", "") or "").strip().upper()
    if position in FRONTAL_VIEWS:
        return position
    if not position:
        for code in _code_values(header, "ViewCodeSequence"):
            if code in VIEW_CODES:
                return VIEW_CODES[code]
    return None


class ChestXrayTask(TaskPlugin):
    """Pneumonia on a frontal chest radiograph (the reference task).

    Accepts CR and DX "for presentation" grayscale images of the chest in a PA or AP view.
    Preprocesses the first PA image of the study (else the first AP image) to a 64x64 input
    in ``[-1, 1]``: Modality LUT, VOI LUT or window, MONOCHROME1 inversion, padding to a
    square, area resizing.
    """

    name = "chest_xray"
    version = "1.0"
    description = "frontal chest radiograph (DX/CR, PA/AP) → pneumonia probability"
    input_shape = (1, SIZE, SIZE)
    finding = PNEUMONIA
    classes = (
        TaskClass("no_pneumonia", ABSENT),
        TaskClass("pneumonia", PRESENT, threshold=0.5),
    )
    he_encoding = HEEncoding(kernel_size=8, stride=8, output_bound=8.0)
    label_aliases = {
        "negative": "no_pneumonia",
        "normal": "no_pneumonia",
        "no": "no_pneumonia",
        "false": "no_pneumonia",
        "positive": "pneumonia",
        "yes": "pneumonia",
        "true": "pneumonia",
    }

    def accepts(self, header: Dataset) -> bool:
        """A CR or DX-for-presentation grayscale image of the chest in a frontal view."""
        if str(header.get("Modality", "")).upper() not in MODALITIES:
            return False
        if str(header.get("SOPClassUID", "")) not in SOP_CLASSES:
            return False
        if str(header.get("PresentationIntentType", "") or "").upper() == "FOR PROCESSING":
            return False
        if int(header.get("SamplesPerPixel", 1) or 1) != 1:
            return False
        body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
        chest = body_part in BODY_PARTS or bool(
            _code_values(header, "AnatomicRegionSequence") & CHEST_CODES
        )
        return chest and view_of(header) is not None

    def select(self, datasets: Sequence[Dataset]) -> Dataset:
        """The image to use: the first PA (lowest Instance Number), else the first AP."""
        candidates = [ds for ds in datasets if self.accepts(ds)]
        if not candidates:
            raise PreprocessingError("the study has no frontal chest radiograph")

        def rank(ds: Dataset) -> tuple[int, int]:
            return (0 if view_of(ds) == "PA" else 1, int(ds.get("InstanceNumber", 0) or 0))

        return min(candidates, key=rank)

    def preprocess(self, datasets: Sequence[Dataset]) -> np.ndarray:
        image = image_to_input(self.select(datasets), (SIZE, SIZE), self.he_encoding.input_range)
        return image[np.newaxis, :, :]

    def build_model(self) -> nn.Module:
        from plugins.chest_xray.model import ChestXrayNet

        return ChestXrayNet(size=SIZE, kernel=self.he_encoding.kernel_size)

    def synthetic_studies(
        self, count: int, *, seed: int, image_size: int
    ) -> Iterator[SyntheticStudy]:
        from plugins.chest_xray.synth import synthetic_studies

        return synthetic_studies(
            count,
            seed=seed,
            image_size=image_size,
            positive_label=self.positive_class.name,
            negative_label=self.classes[0].name,
        )
