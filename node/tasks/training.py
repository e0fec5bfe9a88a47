"""Local training of a task's model on the node's labelled, de-identified studies.

The labelled studies are split, stratified by class and seeded, into a training part and a
held-out part; the model is trained on the first and measured on the second (AUC, accuracy,
sensitivity, specificity, MCC at the task's threshold). Training keeps the logits bounded for
CKKS: binary cross-entropy with label smoothing (whose optimum is a finite logit) plus a
penalty on logits beyond half the task's ``he_encoding.output_bound``; the artifact records
the largest logit seen.

The artifact is a torch file holding only tensors and JSON-compatible metadata (loadable with
``weights_only=True``) plus a JSON sidecar with the same metadata: task name and version,
architecture hash, metrics, split sizes, seed and training options.

This module imports torch: import it only where training runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from node import __version__
from node.errors import NodeError, PluginError
from node.tasks.dataset import LabelledStudy, Skipped, StudyDataset, labelled_studies
from node.tasks.metrics import BinaryMetrics, binary_metrics
from plugins.base import TaskPlugin, architecture_hash
from storage.blobs import BlobStore
from storage.db import Database
from storage.files import atomic_write

logger = logging.getLogger(__name__)

ARTIFACT_FORMAT = "fednode-model/1"

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)`` with phase ``"reading"``, ``"preprocessing"`` or
``"training"``."""


class TrainingError(NodeError):
    """Local training cannot run."""


@dataclass(frozen=True)
class TrainOptions:
    """Options of one local training run."""

    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    holdout: float = 0.25
    """Fraction of each class held out for the metrics."""
    seed: int = 0
    label_smoothing: float = 0.05
    logit_penalty: float = 1.0


@dataclass(frozen=True)
class TrainResult:
    """The outcome of a local training run."""

    task: str
    task_version: str
    model_id: str
    architecture_hash: str
    artifact: Path
    holdout: BinaryMetrics
    train: BinaryMetrics
    n_train: int
    n_holdout: int
    max_abs_logit: float
    options: TrainOptions
    skipped: list[Skipped] = field(default_factory=list)


def split_holdout(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified, seeded split into (train, held out).

    Each class contributes ``round(fraction * n_class)`` studies to the held-out part (at
    least one when the class has two or more studies and *fraction* > 0).
    """
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held: list[int] = []
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        members = members[rng.permutation(len(members))]
        k = round(fraction * len(members))
        if fraction > 0 and len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        held.extend(members[:k].tolist())
        train.extend(members[k:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


def _logits(model: nn.Module, inputs: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        parts = [model(inputs[i : i + batch]).reshape(-1) for i in range(0, len(inputs), batch)]
    return torch.cat(parts) if parts else torch.zeros(0)


def fit_round(
    plugin: TaskPlugin,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    options: TrainOptions,
    *,
    epochs: int,
    learning_rate: float,
    seed: int,
    anneal: bool = True,
    progress: Progress | None = None,
) -> float:
    """Train *model* in place for *epochs* epochs with a schedule of its own.

    One call is one unit of training: a fresh Adam optimiser starting at *learning_rate*,
    annealed by a cosine schedule over these *epochs*, and a shuffling generator seeded with
    *seed*. Local training is one call over all its epochs; a federated round is one call over
    the round's local epochs at the round's learning rate, held constant (``anneal=False``):
    the coordinator's schedule across rounds does the annealing.

    Returns
    -------
    float
        The mean training loss of the last epoch (``nan`` when there is nothing to train on).
    """
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=learning_rate, weight_decay=options.weight_decay
    )
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(1, epochs))
        if anneal
        else None
    )
    smooth = options.label_smoothing
    soft_targets = targets * (1.0 - smooth) + 0.5 * smooth
    margin = plugin.he_encoding.output_bound / 2.0
    loss_fn = nn.BCEWithLogitsLoss()
    n = len(inputs)
    steps = max(1, math.ceil(n / options.batch_size))
    total = epochs * steps
    done = 0
    epoch_loss = math.nan
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        running = 0.0
        for start in range(0, n, options.batch_size):
            idx = order[start : start + options.batch_size]
            logits = model(inputs[idx]).reshape(-1)
            loss = loss_fn(logits, soft_targets[idx])
            loss = loss + options.logit_penalty * torch.relu(logits.abs() - margin).pow(2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            running += float(loss.detach()) * len(idx)
            done += 1
            if progress is not None:
                progress("training", done, total)
        if scheduler is not None:
            scheduler.step()
        epoch_loss = running / n if n else math.nan
        logger.debug("epoch %d/%d: loss %.4f", epoch + 1, epochs, epoch_loss)
    return epoch_loss


def _fit(
    plugin: TaskPlugin,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    options: TrainOptions,
    progress: Progress | None,
) -> None:
    fit_round(
        plugin,
        model,
        inputs,
        targets,
        options,
        epochs=options.epochs,
        learning_rate=options.learning_rate,
        seed=options.seed,
        progress=progress,
    )


def evaluate(
    plugin: TaskPlugin, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[float, BinaryMetrics]:
    """Binary cross-entropy (no smoothing) and the binary metrics of *model* on a set."""
    logits = _logits(model, inputs)
    loss = (
        float(nn.functional.binary_cross_entropy_with_logits(logits, targets))
        if len(targets)
        else math.nan
    )
    threshold = plugin.positive_class.threshold or 0.5
    y = targets.numpy().astype(np.int64)
    return loss, binary_metrics(y, torch.sigmoid(logits).numpy(), threshold)


@dataclass(frozen=True)
class LabelledData:
    """The node's usable labelled studies of a task, preprocessed, with the seeded split."""

    inputs: torch.Tensor
    targets: torch.Tensor
    train_idx: np.ndarray
    held_idx: np.ndarray
    skipped: list[Skipped]

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.train_idx)
        return self.inputs[idx], self.targets[idx]

    @property
    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.held_idx)
        return self.inputs[idx], self.targets[idx]


def load_labelled(
    db: Database,
    blobs: BlobStore,
    plugin: TaskPlugin,
    *,
    holdout: float,
    seed: int,
    progress: Progress | None = None,
) -> LabelledData:
    """Read and preprocess the labelled studies of *plugin*; split them (stratified, seeded).

    Raises
    ------
    TrainingError
        If the task is not binary, the fraction is not in (0, 1), or fewer than two usable
        labelled studies of a class exist.
    """
    if not plugin.is_binary:
        raise TrainingError(f"local training supports binary tasks; {plugin.name} is not")
    if not 0.0 < holdout < 1.0:
        raise TrainingError("the held-out fraction must lie strictly between 0 and 1")

    def reading(done: int, total: int) -> None:
        if progress is not None:
            progress("reading", done, total)

    def preprocessing(done: int, total: int) -> None:
        if progress is not None:
            progress("preprocessing", done, total)

    studies, skipped = labelled_studies(db, blobs, plugin, progress=reading)
    dataset = StudyDataset(studies, blobs, plugin)
    inputs, targets, kept, failed = dataset.load_all(progress=preprocessing)
    skipped = [*skipped, *failed]
    usable: list[LabelledStudy] = [studies[i] for i in kept]
    y = np.array([s.target for s in usable], dtype=np.int64)
    counts = {name: int(np.sum(y == i)) for i, name in enumerate(plugin.class_names)}
    if min(counts.values(), default=0) < 2:
        raise TrainingError(
            f"task {plugin.name} needs at least two usable labelled studies of each class "
            f"(have {counts}); import labels with `fednode labels import`"
        )
    train_idx, held_idx = split_holdout(y, holdout, seed)
    return LabelledData(inputs, targets, train_idx, held_idx, skipped)


def _weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_artifact(
    directory: Path, plugin: TaskPlugin, model: nn.Module, meta: dict[str, Any]
) -> tuple[Path, str]:
    """Write the model and its metadata to *directory*; return the path and the model id."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    model_id = f"{plugin.name}-{plugin.version}-{_weights_digest(state)[:12]}"
    meta = _json_safe({**meta, "model_id": model_id, "format": ARTIFACT_FORMAT})
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"{model_id}.pt"
    buf = io.BytesIO()
    torch.save({"meta_json": json.dumps(meta, sort_keys=True), "state_dict": state}, buf)
    atomic_write(path, buf.getvalue(), mode=0o600)
    atomic_write(
        path.with_suffix(".json"), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    )
    return path, model_id


def load_artifact(path: Path, plugin: TaskPlugin) -> tuple[nn.Module, dict[str, Any]]:
    """Load an artifact written by :func:`save_artifact` into a fresh model of *plugin*.

    Raises
    ------
    PluginError
        If the artifact is of another task, or its architecture hash differs from the
        plugin's current model (the weights would not fit).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta: dict[str, Any] = json.loads(blob["meta_json"])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise PluginError(f"cannot read model artifact {path}: {type(exc).__name__}") from exc
    model = plugin.build_model()
    if meta.get("task") != plugin.name:
        raise PluginError(f"artifact {path.name} is a model of task {meta.get('task')!r}")
    if meta.get("architecture_hash") != architecture_hash(plugin, model):
        raise PluginError(
            f"artifact {path.name} does not match the architecture of task "
            f"{plugin.name} {plugin.version}"
        )
    model.load_state_dict(blob["state_dict"])
    return model, meta


def train_local(
    db: Database,
    blobs: BlobStore,
    plugin: TaskPlugin,
    models_dir: Path,
    options: TrainOptions | None = None,
    *,
    progress: Progress | None = None,
) -> TrainResult:
    """Train *plugin*'s model on the node's labelled studies and save the artifact.

    Raises
    ------
    TrainingError
        If the task is not binary, or too few usable labelled studies of each class exist.
    """
    options = options or TrainOptions()
    data = load_labelled(
        db, blobs, plugin, holdout=options.holdout, seed=options.seed, progress=progress
    )
    inputs, targets, skipped = data.inputs, data.targets, data.skipped
    y = targets.numpy().astype(np.int64)
    train_idx, held_idx = data.train_idx, data.held_idx
    torch.manual_seed(options.seed)
    model = plugin.build_model()
    arch = architecture_hash(plugin, model)
    t_train = torch.from_numpy(train_idx)
    t_held = torch.from_numpy(held_idx)
    logger.info(
        "training %s %s on %d studies, %d held out (%d left out)",
        plugin.name,
        plugin.version,
        len(train_idx),
        len(held_idx),
        len(skipped),
    )
    _fit(plugin, model, inputs[t_train], targets[t_train], options, progress)
    threshold = plugin.positive_class.threshold or 0.5
    logits_train = _logits(model, inputs[t_train])
    logits_held = _logits(model, inputs[t_held])
    train_metrics = binary_metrics(y[train_idx], torch.sigmoid(logits_train).numpy(), threshold)
    held_metrics = binary_metrics(y[held_idx], torch.sigmoid(logits_held).numpy(), threshold)
    max_logit = float(torch.cat([logits_train, logits_held]).abs().max())
    if max_logit >= plugin.he_encoding.output_bound:
        logger.warning(
            "largest |logit| %.2f exceeds the task's CKKS output bound %.1f",
            max_logit,
            plugin.he_encoding.output_bound,
        )
    meta = {
        "task": plugin.name,
        "task_version": plugin.version,
        "architecture_hash": arch,
        "created_at": datetime.now(UTC).isoformat(),
        "source": "local",
        "fednode_version": __version__,
        "torch_version": torch.__version__,
        "input_shape": list(plugin.input_shape),
        "classes": list(plugin.class_names),
        "threshold": threshold,
        "he_encoding": asdict(plugin.he_encoding),
        "max_abs_logit": max_logit,
        "n_train": len(train_idx),
        "n_holdout": len(held_idx),
        "metrics": held_metrics.as_dict(),
        "train_metrics": train_metrics.as_dict(),
        "options": asdict(options),
    }
    path, model_id = save_artifact(models_dir, plugin, model, meta)
    logger.info(
        "model %s saved: held-out AUC %.3f, accuracy %.3f",
        model_id,
        held_metrics.auc,
        held_metrics.accuracy,
    )
    return TrainResult(
        task=plugin.name,
        task_version=plugin.version,
        model_id=model_id,
        architecture_hash=arch,
        artifact=path,
        holdout=held_metrics,
        train=train_metrics,
        n_train=len(train_idx),
        n_holdout=len(held_idx),
        max_abs_logit=max_logit,
        options=options,
        skipped=skipped,
    )
