"""Read de-identified studies from storage for the tasks: headers, instances, task inputs.

Everything here reads the de-identified copies (blob store + ``deid_instances``); nothing reads
the spool or the vault. Exception messages hold pseudonymous keys and plugin messages about
de-identified data only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.errors import NodeError, PluginError
from node.logs import short_key
from plugins.base import TaskPlugin, TaskPluginError
from storage.blobs import BlobStore
from storage.models import DeidInstance, Study

if TYPE_CHECKING:
    from node.jobs import InferPayload, JobContext

logger = logging.getLogger(__name__)

MAX_MESSAGE = 300
"""Longest plugin message kept in a job error."""


class TaskInputError(NodeError):
    """A study cannot become the input of a task.

    Retrying cannot help (the data or the configuration is wrong); a job handler turns it into
    :class:`node.jobs.PermanentJobError`, ``fednode train`` leaves the study out.
    """


class StudyDataError(TaskInputError):
    """A stored de-identified instance could not be read as DICOM."""


@dataclass(frozen=True)
class StoredInstance:
    """A de-identified instance of a study, as the ``deid_instances`` table knows it."""

    sop_key: str
    series_key: str
    sop_class_uid: str
    blob_ref: str


@dataclass(frozen=True)
class TaskInput:
    """The preprocessed input of one task for one version of a study."""

    task: str
    task_version: str
    study_key: str
    study_version: int
    sop_keys: tuple[str, ...]
    array: np.ndarray


def instances_of(session: Session, study_key: str) -> list[StoredInstance]:
    """The de-identified instances of *study_key*, oldest first."""
    rows = session.execute(
        select(
            DeidInstance.sop_key,
            DeidInstance.series_key,
            DeidInstance.sop_class_uid,
            DeidInstance.blob_ref,
        )
        .where(DeidInstance.study_key == study_key)
        .order_by(DeidInstance.created_at, DeidInstance.sop_key)
    ).all()
    return [StoredInstance(*row) for row in rows]


def read_header(blobs: BlobStore, ref: str) -> Dataset:
    """The header of a stored instance (its pixel data is not parsed)."""
    return _parse(blobs, ref, stop_before_pixels=True)


def read_instance(blobs: BlobStore, ref: str) -> Dataset:
    """A stored instance with its pixel data."""
    return _parse(blobs, ref, stop_before_pixels=False)


def _parse(blobs: BlobStore, ref: str, *, stop_before_pixels: bool) -> Dataset:
    data = blobs.get(ref)  # authenticated (or, stored by an earlier build, digest-verified)
    try:
        return dcmread(BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise StudyDataError(f"blob {ref} is not readable DICOM: {type(exc).__name__}") from exc


def safe_accepts(plugin: TaskPlugin, header: Dataset) -> bool:
    """``plugin.accepts(header)``; a plugin that raises is logged and treated as "no"."""
    try:
        return bool(plugin.accepts(header))
    except Exception as exc:
        logger.warning(
            "task %s %s raised in accepts(): %s; instance not selected",
            plugin.name,
            plugin.version,
            type(exc).__name__,
        )
        return False


def accepted_by(
    tasks: Mapping[str, TaskPlugin], headers: Mapping[str, Dataset]
) -> dict[str, list[str]]:
    """For each task, the keys of the instances (of *headers*, by SOP key) it accepts."""
    out: dict[str, list[str]] = {}
    for name, plugin in tasks.items():
        keys = [key for key, header in headers.items() if safe_accepts(plugin, header)]
        if keys:
            out[name] = keys
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def preprocess(plugin: TaskPlugin, datasets: Sequence[Dataset]) -> np.ndarray:
    """Run *plugin*'s preprocessing and check its output against the plugin's contract.

    Raises
    ------
    TaskInputError
        If the plugin raises or returns something other than ``float32`` of its input shape
        within its HE input range; the message names the task, its version and the reason.
    """
    where = f"task {plugin.name} {plugin.version}"
    try:
        array = plugin.preprocess(datasets)
    except TaskPluginError as exc:
        raise TaskInputError(f"{where}: preprocessing failed: {_short(exc)}") from exc
    except Exception as exc:
        raise TaskInputError(
            f"{where}: preprocessing raised {type(exc).__name__}: {_short(exc)}"
        ) from exc
    if not isinstance(array, np.ndarray) or array.shape != plugin.input_shape:
        shape = getattr(array, "shape", type(array).__name__)
        raise TaskInputError(
            f"{where}: preprocessing returned {shape}, expected {plugin.input_shape}"
        )
    lo, hi = plugin.he_encoding.input_range
    if not np.all(np.isfinite(array)) or array.min() < lo - 1e-6 or array.max() > hi + 1e-6:
        raise TaskInputError(f"{where}: preprocessing returned values outside [{lo}, {hi}]")
    return array.astype(np.float32, copy=False)


def study_datasets(blobs: BlobStore, instances: Iterable[StoredInstance]) -> list[Dataset]:
    """The full de-identified datasets of *instances*."""
    return [read_instance(blobs, inst.blob_ref) for inst in instances]


def current_version(session: Session, study_key: str) -> int | None:
    """The study's current version, or ``None`` if the study is unknown."""
    return session.execute(
        select(Study.version).where(Study.study_key == study_key)
    ).scalar_one_or_none()


def prepare_task_input(
    ctx: JobContext, payload: InferPayload, tasks: Mapping[str, TaskPlugin] | None = None
) -> TaskInput | None:
    """Read and preprocess the study an ``infer`` job names: the first step of inference.

    Parameters
    ----------
    ctx : JobContext
        The worker's context.
    payload : InferPayload
        The ``infer`` job's payload (queued by :mod:`node.pipeline.assemble`).
    tasks : mapping of str to TaskPlugin, optional
        The enabled tasks (default: loaded from ``ctx.settings``).

    Returns
    -------
    TaskInput or None
        ``None`` if the study has a newer version since the job was queued (a newer job
        supersedes this one: complete it without work).

    Raises
    ------
    TaskInputError
        A task that is not enabled or cannot be loaded, a study that is not in storage, or a
        plugin that fails to preprocess: retrying cannot help.
    """
    study_key, version, name = payload.study_key, payload.study_version, payload.task
    sop_keys = payload.sop_keys
    if tasks is None:
        from node.tasks import load_tasks

        try:
            tasks = load_tasks(ctx.settings)
        except PluginError as exc:
            raise TaskInputError(f"task {name!r} cannot be loaded: {exc}") from exc
    plugin = tasks.get(name)
    if plugin is None:
        raise TaskInputError(f"task {name!r} is not enabled on this node")
    with ctx.db.session() as session:
        current = current_version(session, study_key)
        if current is None:
            raise TaskInputError(f"study {study_key} is not in storage")
        if current != version:
            logger.info(
                "study %s is at version %d; job for version %d superseded",
                short_key(study_key),
                current,
                version,
                extra={"study_key": study_key},
            )
            return None
        wanted = set(sop_keys)
        instances = [i for i in instances_of(session, study_key) if i.sop_key in wanted]
    if not instances:
        raise TaskInputError(f"study {study_key} has none of the instances the job names")
    datasets = study_datasets(ctx.blobs, instances)
    array = preprocess(plugin, datasets)
    return TaskInput(
        task=plugin.name,
        task_version=plugin.version,
        study_key=study_key,
        study_version=version,
        sop_keys=tuple(i.sop_key for i in instances),
        array=array,
    )
