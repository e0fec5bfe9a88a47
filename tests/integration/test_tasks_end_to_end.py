"""The task side on the node's real de-identification: synthetic chest studies go through the
``deidentify`` job (Annex E), the worker's periodic assembly sweep queues their ``infer``
jobs, labels keyed by the *original* accession numbers and study UIDs find the de-identified
studies, and the chest task still selects and preprocesses the de-identified images.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy import select

from node.deid.pseudonyms import uid_pseudonym
from node.jobs import InferPayload, JobKind, load_handlers, parse_payload
from node.pipeline.assemble import sweep
from node.tasks import load_tasks
from node.tasks.dataset import StudyDataset, labelled_studies
from node.tasks.labels import import_labels
from node.tasks.studies import prepare_task_input
from node.worker import Worker
from storage.models import Study
from storage.records import JobState, StudyState
from tests.support.storage import make_context, receive_instance

STUDIES = 12


def test_received_synthetic_studies_become_labelled_task_inputs(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, quiet_period_seconds=0, sweep_seconds=0.01)
    plugin = load_tasks(ctx.settings)["chest_xray"]
    generated = list(plugin.synthetic_studies(STUDIES, seed=21, image_size=128))
    for study in generated:
        for ds in study.datasets:
            receive_instance(ctx, ds)

    handlers = load_handlers()
    worker = Worker(ctx, {JobKind.DEIDENTIFY: handlers[JobKind.DEIDENTIFY]}, name="t")
    while (job := ctx.queue.lease("t", [JobKind.DEIDENTIFY], 60)) is not None:
        assert worker.run_one(job) is JobState.DONE, job
    with ctx.db.session() as s:
        states = s.execute(select(Study.state)).scalars().all()
    assert states == [StudyState.RECEIVING.value] * STUDIES

    worker.run_periodic()  # the assembly sweep, as the worker loop runs it
    jobs = ctx.queue.list(kind=JobKind.INFER)
    assert len(jobs) == STUDIES
    assert sweep(ctx, now=datetime.now(UTC) + timedelta(hours=1)).completed == 0
    # every de-identified study still offers exactly its frontal view to the task
    assert all(len(j.payload["sop_keys"]) == 1 for j in jobs)
    payload = parse_payload(jobs[0].kind, jobs[0].payload)
    assert isinstance(payload, InferPayload)
    prepared = prepare_task_input(ctx, payload)
    assert prepared is not None and prepared.array.shape == (1, 64, 64)

    # half the labels by original accession number, half by original study UID
    lines = ["accession_number,study_instance_uid,chest_xray"]
    for i, study in enumerate(generated):
        if i % 2:
            lines.append(f"{study.accession_number},,{study.label}")
        else:
            lines.append(f",{study.study_instance_uid},{study.label}")
    path = tmp_path / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    report = import_labels(ctx.db, ctx.keys.site, {"chest_xray": plugin}, path)
    assert report.imported and report.inserted == STUDIES, (report.bad, report.unknown)

    studies, skipped = labelled_studies(ctx.db, ctx.blobs, plugin)
    assert len(studies) == STUDIES and not skipped
    dataset = StudyDataset(studies, ctx.blobs, plugin)
    inputs, targets, kept, failed = dataset.load_all()
    assert inputs.shape == (STUDIES, 1, 64, 64) and not failed
    assert kept == list(range(STUDIES))
    expected = sorted(
        (uid_pseudonym(ctx.keys.site, s.study_instance_uid), plugin.class_index(s.label))
        for s in generated
    )
    assert sorted((s.study_key, s.target) for s in studies) == expected
    assert float(inputs.min()) >= -1.0 and float(inputs.max()) <= 1.0
    assert np.asarray(targets).sum() == sum(s.label == "pneumonia" for s in generated)
