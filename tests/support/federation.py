"""Synthetic federated sites for the federation tests and benchmark.

Each site is a node's storage (SQLite + blob store) holding de-identified synthetic chest
studies with labels, as ``fednode labels import`` leaves them. Sites differ in seed and in
prevalence of the finding (label shift between hospitals); a shared held-out set is generated
apart from all of them and preprocessed directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from node.jobs import JobContext
from plugins.base import TaskPlugin
from plugins.chest_xray.synth import synthetic_studies
from storage.models import Label
from tests.support.storage import DeidStore, make_context

SITE_PREVALENCE = (0.3, 0.5, 0.7)


def populate(
    ctx: JobContext, plugin: TaskPlugin, count: int, *, seed: int, prevalence: float
) -> list[str]:
    """Store *count* labelled synthetic studies in *ctx*'s storage; return their study keys."""
    store = DeidStore(ctx)
    labels = []
    keys = []
    for study in synthetic_studies(
        count,
        seed=seed,
        image_size=64,
        positive_label=plugin.positive_class.name,
        negative_label=plugin.classes[0].name,
        prevalence=prevalence,
    ):
        for ds in study.datasets:
            store.add(ds)
        key = store.study_key(study.study_instance_uid)
        keys.append(key)
        labels.append(Label(study_key=key, task=plugin.name, label=study.label))
    with ctx.db.session() as s:
        s.add_all(labels)
    return keys


def make_site(
    root: Path, plugin: TaskPlugin, index: int, count: int
) -> tuple[JobContext, list[str]]:
    """Site *index* (0, 1, 2 ...) with *count* studies under *root*."""
    ctx = make_context(root, master=bytes([index + 1]) * 32)
    keys = populate(
        ctx,
        plugin,
        count,
        seed=1000 + index,
        prevalence=SITE_PREVALENCE[index % len(SITE_PREVALENCE)],
    )
    return ctx, keys


def shared_holdout(
    plugin: TaskPlugin, count: int, *, seed: int = 99
) -> tuple[torch.Tensor, torch.Tensor]:
    """A held-out set no site has: preprocessed inputs and targets."""
    xs, ys = [], []
    for study in plugin.synthetic_studies(count, seed=seed, image_size=64):
        xs.append(torch.from_numpy(plugin.preprocess(list(study.datasets))))
        ys.append(float(plugin.class_index(study.label)))
    return torch.stack(xs), torch.tensor(np.array(ys, dtype=np.float32))
