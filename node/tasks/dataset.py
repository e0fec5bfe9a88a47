"""A torch Dataset over the node's de-identified studies and their labels.

This module imports torch: import it only where a dataset is needed (training), never from the
receive path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pydicom.dataset import Dataset as DicomDataset
from sqlalchemy import select
from torch.utils.data import Dataset

from node.logs import short_key
from node.tasks.studies import (
    StoredInstance,
    StudyDataError,
    TaskInputError,
    instances_of,
    preprocess,
    read_header,
    read_instance,
    safe_accepts,
)
from plugins.base import TaskPlugin
from storage.blobs import BlobStore
from storage.db import Database
from storage.errors import StorageError
from storage.models import Label

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done, total)``."""


@dataclass(frozen=True)
class LabelledStudy:
    """A labelled study with the de-identified instances its task accepts."""

    study_key: str
    label: str
    target: int
    instances: tuple[StoredInstance, ...]


@dataclass(frozen=True)
class Skipped:
    """A labelled study left out of a dataset, and why (pseudonymous key only)."""

    study_key: str
    reason: str


def labelled_studies(
    db: Database, blobs: BlobStore, plugin: TaskPlugin, *, progress: Progress | None = None
) -> tuple[list[LabelledStudy], list[Skipped]]:
    """The studies labelled for *plugin* that have at least one instance it accepts.

    Returns the studies (ordered by study key, so a seeded split is reproducible) and those
    left out: no stored instance, no accepted instance, or a label that is not a class of the
    task (for example after a change of the task's classes).
    """
    with db.session() as session:
        labels = session.execute(
            select(Label.study_key, Label.label)
            .where(Label.task == plugin.name)
            .order_by(Label.study_key)
        ).all()
        stored = {key: instances_of(session, key) for key, _ in labels}
    studies: list[LabelledStudy] = []
    skipped: list[Skipped] = []
    for done, (key, label) in enumerate(labels, start=1):
        if progress is not None:
            progress(done, len(labels))
        if label not in plugin.class_names:
            skipped.append(Skipped(key, f"label {label!r} is not a class of the task"))
            continue
        accepted = []
        for inst in stored[key]:
            try:
                header = read_header(blobs, inst.blob_ref)
            except (StorageError, StudyDataError) as exc:
                logger.warning("study %s: instance %s unreadable: %s", short_key(key),
                               short_key(inst.sop_key), exc, extra={"study_key": key})
                continue
            if safe_accepts(plugin, header):
                accepted.append(inst)
        if not stored[key]:
            skipped.append(Skipped(key, "no de-identified instance in storage"))
        elif not accepted:
            skipped.append(Skipped(key, "no instance the task accepts"))
        else:
            studies.append(LabelledStudy(key, label, plugin.class_index(label), tuple(accepted)))
    return studies, skipped


class StudyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Labelled studies as ``(input, target)`` pairs: the task's preprocessed input
    (``float32``, the task's input shape) and the class index as a ``float32`` scalar.

    Instances are read from the blob store (authenticated) and preprocessed on first access;
    with *cache* the inputs are kept in memory (a 64x64 input is 16 KiB).
    """

    def __init__(
        self,
        studies: list[LabelledStudy],
        blobs: BlobStore,
        plugin: TaskPlugin,
        *,
        cache: bool = True,
    ) -> None:
        self.studies = list(studies)
        self.blobs = blobs
        self.plugin = plugin
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.studies)

    def datasets(self, index: int) -> list[DicomDataset]:
        return [read_instance(self.blobs, i.blob_ref) for i in self.studies[index].instances]

    def input(self, index: int) -> torch.Tensor:
        """The preprocessed input of study *index*.

        Raises
        ------
        TaskInputError
            If the task's preprocessing fails (the message names the task and the reason).
        """
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        datasets = self.datasets(index)
        tensor = torch.from_numpy(preprocess(self.plugin, datasets))
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.tensor(float(self.studies[index].target), dtype=torch.float32)
        return self.input(index), target

    @property
    def targets(self) -> np.ndarray:
        return np.array([s.target for s in self.studies], dtype=np.int64)

    def load_all(
        self, *, progress: Progress | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int], list[Skipped]]:
        """Preprocess every study once.

        Returns
        -------
        inputs, targets : torch.Tensor
            Stacked inputs ``(N, *input_shape)`` and targets ``(N,)`` of the usable studies.
        kept : list of int
            Their indices in this dataset.
        skipped : list of Skipped
            Studies whose preprocessing failed, with the reason.
        """
        inputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        kept: list[int] = []
        skipped: list[Skipped] = []
        for index in range(len(self)):
            try:
                x, y = self[index]
            except (TaskInputError, StorageError) as exc:
                skipped.append(Skipped(self.studies[index].study_key, str(exc)))
                key = self.studies[index].study_key
                logger.warning("study %s left out: %s", short_key(key), exc,
                               extra={"study_key": key})
            else:
                inputs.append(x)
                targets.append(y)
                kept.append(index)
            if progress is not None:
                progress(index + 1, len(self))
        shape = (0, *self.plugin.input_shape)
        stacked = torch.stack(inputs) if inputs else torch.zeros(shape)
        return stacked, torch.stack(targets) if targets else torch.zeros(0), kept, skipped
