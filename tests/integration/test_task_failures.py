"""Plugin failures are reported, not fatal: a broken reference stops start-up with a clear
message; in a job, an unloadable task or a plugin raising in preprocessing dead-letters that
job with the reason while the worker carries on.

The ``infer`` handler belongs to a later issue; here a handler made of its first step,
:func:`node.tasks.studies.prepare_task_input`, runs in the real :class:`node.worker.Worker`
over the real SQL queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.errors import PluginError
from node.jobs import InferPayload, JobContext, JobKind, PermanentJobError, parse_payload
from node.pipeline.assemble import sweep
from node.tasks import load_tasks
from node.tasks.studies import TaskInput, TaskInputError, prepare_task_input
from node.worker import Worker
from plugins.chest_xray import ChestXrayTask
from storage.records import Job, JobState
from tests.support.dicomgen import FakeStudy, dx_instance
from tests.support.storage import DeidStore, make_context

EXPLODING = "tests.integration.test_task_failures:ExplodingTask"


class ExplodingTask(ChestXrayTask):
    """Accepts what the chest task accepts, then fails to preprocess."""

    name = "exploding"

    def preprocess(self, datasets: Sequence[Dataset]) -> np.ndarray:
        raise RuntimeError("the plugin's own bug")


prepared: list[TaskInput | None] = []


def infer_first_step(job: Job, ctx: JobContext) -> None:
    """The first step of the ``infer`` handler: a task-input error is a job outcome there."""
    payload = parse_payload(job.kind, job.payload)
    assert isinstance(payload, InferPayload)
    try:
        prepared.append(prepare_task_input(ctx, payload))
    except TaskInputError as exc:
        raise PermanentJobError(str(exc)) from exc


def run_all(ctx: JobContext) -> list[Job]:
    worker = Worker(ctx, {JobKind.INFER: infer_first_step}, name="t", periodic=False)
    while (job := ctx.queue.lease("t", [JobKind.INFER], 30)) is not None:
        worker.run_one(job)
    return sorted(ctx.queue.list(kind=JobKind.INFER), key=lambda j: j.id)


def one_study(ctx: JobContext) -> None:
    DeidStore(ctx).add(
        dx_instance(FakeStudy(), generate_uid(), 0, size=32),
        at=datetime.now(UTC) - timedelta(seconds=5),
    )


def test_broken_reference_fails_at_start_up_with_a_clear_message(tmp_path: Path) -> None:
    ctx = make_context(tmp_path, enabled=["chest_xray", "fednode_missing.tasks:Task"])
    with pytest.raises(
        PluginError,
        match=r"module 'fednode_missing.tasks' not found.*"
        r"\[tasks\] enabled",
    ):
        load_tasks(ctx.settings)


def test_plugin_raising_in_preprocessing_dead_letters_only_its_job(tmp_path: Path) -> None:
    prepared.clear()
    ctx = make_context(tmp_path, quiet_period_seconds=0, enabled=["chest_xray", EXPLODING])
    one_study(ctx)
    assert sweep(ctx).infer_jobs == 2
    jobs = {j.payload["task"]: j for j in run_all(ctx)}
    assert jobs["chest_xray"].state is JobState.DONE
    dead = jobs["exploding"]
    assert dead.state is JobState.DEAD and dead.attempts == 1  # permanent: not retried
    assert dead.last_error == (
        "task exploding 1.0: preprocessing raised RuntimeError: the plugin's own bug"
    )
    (ok,) = [p for p in prepared if p is not None]
    assert ok.task == "chest_xray" and ok.array.shape == (1, 64, 64)


def test_job_of_a_task_that_cannot_be_loaded_any_more_is_dead_lettered(
    tmp_path: Path,
) -> None:
    ctx = make_context(tmp_path, quiet_period_seconds=0)
    one_study(ctx)
    assert sweep(ctx).infer_jobs == 1
    # the node restarts with a configuration whose reference is broken
    broken = make_context(tmp_path / "other", enabled=["fednode_missing.tasks:Task"])
    later = JobContext(broken.settings, ctx.db, ctx.queue, ctx.keys)
    (job,) = run_all(later)
    assert job.state is JobState.DEAD
    assert job.last_error is not None
    assert job.last_error.startswith("task 'chest_xray' cannot be loaded: task plugin")
    assert "fednode_missing.tasks" in job.last_error


def test_job_of_an_older_study_version_does_nothing(tmp_path: Path) -> None:
    prepared.clear()
    ctx = make_context(tmp_path, quiet_period_seconds=0)
    store = DeidStore(ctx)
    study = FakeStudy()
    store.add(
        dx_instance(study, generate_uid(), 0, size=32), at=datetime.now(UTC) - timedelta(seconds=5)
    )
    sweep(ctx)
    store.add(dx_instance(study, generate_uid(), 1, size=32))  # re-opens: version 2
    (job,) = run_all(ctx)
    assert job.state is JobState.DONE and prepared == [None]
