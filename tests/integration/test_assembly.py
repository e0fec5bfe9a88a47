"""Study assembly over time: the quiet period, de-identification still pending, re-opening,
task selection, concurrent sweeps and the worker's periodic hook (real SQLite + SqlQueue)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.jobs import PERIODIC, JobContext, JobKind
from node.pipeline.assemble import infer_dedupe_key, sweep
from node.worker import Worker
from storage.db import Database
from storage.models import Result, Study
from storage.queue import SqlQueue
from storage.records import JobState, StudyState
from tests.support.dicomgen import FakeStudy, ct_instance, dx_instance
from tests.support.storage import DeidStore, make_context

T0 = datetime(2026, 3, 11, 10, 0, tzinfo=UTC)
QUIET = 60.0


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    return make_context(tmp_path, quiet_period_seconds=QUIET)


def infer_jobs(ctx: JobContext) -> list:  # type: ignore[type-arg]
    return sorted(ctx.queue.list(kind=JobKind.INFER), key=lambda j: j.id)


def study_row(ctx: JobContext, key: str) -> Study:
    with ctx.db.session() as s:
        row = s.get(Study, key)
        assert row is not None
        return row


def chest(study: FakeStudy, view: str = "PA", index: int = 0):  # type: ignore[no-untyped-def]
    ds = dx_instance(study, generate_uid(), index, size=64)
    ds.ViewPosition = view
    return ds


def test_study_completes_only_after_the_quiet_period(ctx: JobContext) -> None:
    store = DeidStore(ctx)
    study = FakeStudy()
    first = store.add(chest(study, index=0), at=T0)
    second = store.add(chest(study, index=1), at=T0 + timedelta(seconds=40))
    key = store.study_key(study.study_uid)

    # 30 s after the last instance: still receiving, nothing queued
    report = sweep(ctx, now=T0 + timedelta(seconds=70))
    assert report.completed == 0
    assert study_row(ctx, key).state == StudyState.RECEIVING
    assert infer_jobs(ctx) == []

    # the quiet period has passed since the *last* instance
    report = sweep(ctx, now=T0 + timedelta(seconds=101))
    assert (report.completed, report.infer_jobs) == (1, 1)
    row = study_row(ctx, key)
    assert row.state == StudyState.COMPLETE
    assert row.completed_at == T0 + timedelta(seconds=101)
    (job,) = infer_jobs(ctx)
    assert job.payload["study_key"] == key
    assert job.payload["study_version"] == 1
    assert job.payload["task"] == "chest_xray"
    assert job.payload["task_version"] == "1.0"
    assert sorted(job.payload["sop_keys"]) == sorted([first, second])
    assert job.dedupe_key == infer_dedupe_key("chest_xray", key, 1)

    # sweeping again changes nothing
    assert sweep(ctx, now=T0 + timedelta(seconds=500)).completed == 0
    assert len(infer_jobs(ctx)) == 1


def test_new_instance_reopens_and_new_version_supersedes(ctx: JobContext) -> None:
    store = DeidStore(ctx)
    study = FakeStudy()
    store.add(chest(study), at=T0)
    key = store.study_key(study.study_uid)
    sweep(ctx, now=T0 + timedelta(seconds=QUIET + 1))
    assert study_row(ctx, key).version == 1
    with ctx.db.session() as s:  # the result an infer job would have written for version 1
        s.add(
            Result(
                study_key=key,
                task="chest_xray",
                study_version=1,
                label="pneumonia",
                probability=0.9,
                model_id="m1",
            )
        )

    late = store.add(chest(study, view="AP", index=5), at=T0 + timedelta(seconds=600))
    row = study_row(ctx, key)
    assert (row.state, row.version) == (StudyState.RECEIVING, 2)
    assert sweep(ctx, now=T0 + timedelta(seconds=630)).completed == 0

    report = sweep(ctx, now=T0 + timedelta(seconds=600 + QUIET + 1))
    assert (report.completed, report.infer_jobs) == (1, 1)
    v1, v2 = infer_jobs(ctx)
    assert (v1.payload["study_version"], v2.payload["study_version"]) == (1, 2)
    assert late in v2.payload["sop_keys"] and len(v2.payload["sop_keys"]) == 2
    assert v2.dedupe_key == infer_dedupe_key("chest_xray", key, 2)
    with ctx.db.session() as s:
        old = s.execute(select(Result).where(Result.study_key == key)).scalar_one()
        assert old.superseded is True


def test_pending_deidentification_holds_the_study(ctx: JobContext) -> None:
    store = DeidStore(ctx)
    study = FakeStudy()
    store.add(chest(study, index=0), at=T0)
    waiting = chest(study, index=1)
    store.pending(waiting, at=T0 + timedelta(seconds=5))
    report = sweep(ctx, now=T0 + timedelta(seconds=3600))
    assert (report.completed, report.waiting) == (0, 1)
    store.add(waiting, at=T0 + timedelta(seconds=3600))
    assert sweep(ctx, now=T0 + timedelta(seconds=3600 + QUIET)).completed == 1
    (job,) = infer_jobs(ctx)
    assert len(job.payload["sop_keys"]) == 2


def test_only_accepting_tasks_get_jobs(ctx: JobContext) -> None:
    store = DeidStore(ctx)
    ct = FakeStudy()
    ct_key = store.study_key(ct.study_uid)
    series = generate_uid()
    for i in range(3):
        store.add(ct_instance(ct, series, 1, i, size=32), at=T0)
    lateral_only = FakeStudy()
    store.add(chest(lateral_only, view="LL"), at=T0)
    two_views = FakeStudy()
    pa = store.add(chest(two_views, view="PA"), at=T0)
    store.add(chest(two_views, view="LL", index=1), at=T0)

    report = sweep(ctx, now=T0 + timedelta(seconds=QUIET))
    assert (report.completed, report.infer_jobs) == (3, 1)
    (job,) = infer_jobs(ctx)
    assert job.payload["study_key"] == store.study_key(two_views.study_uid)
    assert job.payload["sop_keys"] == [pa]
    assert study_row(ctx, ct_key).state == StudyState.COMPLETE


def test_concurrent_sweeps_queue_each_job_once(ctx: JobContext) -> None:
    store = DeidStore(ctx)
    for _ in range(12):
        store.add(chest(FakeStudy()), at=T0)
    contexts = []
    for _ in range(3):
        db = Database(ctx.db.url)
        contexts.append(JobContext(ctx.settings, db, SqlQueue(db), ctx.keys))
    reports = []
    barrier = threading.Barrier(len(contexts))

    def run(c: JobContext) -> None:
        barrier.wait()
        reports.append(sweep(c, now=T0 + timedelta(seconds=QUIET)))

    threads = [threading.Thread(target=run, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.completed for r in reports) == 12
    assert sum(r.infer_jobs for r in reports) == 12
    assert len(infer_jobs(ctx)) == 12
    assert len({j.payload["study_key"] for j in infer_jobs(ctx)}) == 12


def test_worker_runs_the_sweep_periodically(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, quiet_period_seconds=0, sweep_seconds=0.01)
    assert "assemble" in PERIODIC
    store = DeidStore(ctx)
    store.add(chest(FakeStudy()), at=datetime.now(UTC) - timedelta(seconds=1))
    worker = Worker(ctx, {}, name="test-worker")
    worker.run_periodic()
    (job,) = infer_jobs(ctx)
    assert job.state is JobState.QUEUED
