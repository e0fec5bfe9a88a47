"""The worker loop: dispatch by kind, retry with backoff, dead letters, heartbeat, sweeps."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from node.config import load_settings
from node.config_template import render
from node.jobs import PERIODIC, JobContext, JobKind, PermanentJobError, Sweep
from node.keys import NodeKeys
from node.worker import Worker, backoff_delay
from storage.db import Database
from storage.models import AuditEvent
from storage.queue import SqlQueue
from storage.records import Job, JobState


@pytest.fixture
def ctx(tmp_path: Path, sqlite_db: Database) -> JobContext:
    cfg = tmp_path / "fednode.toml"
    cfg.write_text(render())
    settings = load_settings(cfg)
    fast = settings.workers.model_copy(
        update={
            "backoff_seconds": 0.05,
            "backoff_max_seconds": 0.1,
            "max_attempts": 3,
            "lease_seconds": 0.4,
            "poll_seconds": 0.02,
        }
    )
    settings = settings.model_copy(update={"workers": fast})
    return JobContext(
        settings=settings,
        db=sqlite_db,
        queue=SqlQueue(sqlite_db, default_max_attempts=3),
        keys=NodeKeys.from_master(os.urandom(32)),
    )


def drain(worker: Worker, seconds: float, until: Callable[[], bool] | None = None) -> None:
    """Run *worker* for *seconds*, or, with *until*, until it holds (at most 30 s: a busy
    machine must not fail a test whose jobs take their retries' back-off to finish)."""
    t = threading.Thread(target=worker.run)
    t.start()
    if until is None:
        time.sleep(seconds)
    else:
        deadline = time.monotonic() + 30
        while not until() and time.monotonic() < deadline:
            time.sleep(0.02)
    worker.stop.set()
    t.join(10)
    assert not t.is_alive()


def settled(ctx: JobContext) -> Callable[[], bool]:
    """True once no job is queued or leased any more."""
    return lambda: all(j.state in (JobState.DONE, JobState.DEAD) for j in ctx.queue.list())


def test_backoff_doubles_and_caps() -> None:
    assert backoff_delay(1, 10, 3600, jitter=0) == 10
    assert backoff_delay(3, 10, 3600, jitter=0) == 40
    assert backoff_delay(20, 10, 3600, jitter=0) == 3600
    assert 8 <= backoff_delay(1, 10, 3600) <= 12


def test_flaky_handler_is_retried_until_done(ctx: JobContext) -> None:
    calls: list[int] = []

    def flaky(job: Job, _ctx: JobContext) -> None:
        calls.append(job.attempts)
        if len(calls) < 3:
            raise RuntimeError("transient")

    ctx.queue.enqueue("flaky", {})
    drain(Worker(ctx, {"flaky": flaky}, periodic=False), 1.5, until=settled(ctx))
    assert calls == [1, 2, 3]
    [job] = ctx.queue.list()
    assert job.state is JobState.DONE and job.attempts == 3


def test_always_failing_handler_is_dead_lettered_with_last_error(ctx: JobContext) -> None:
    def broken(job: Job, _ctx: JobContext) -> None:
        raise ValueError(f"bad input #{job.attempts}")

    ctx.queue.enqueue("broken", {})
    drain(Worker(ctx, {"broken": broken}, periodic=False), 1.5, until=settled(ctx))
    [job] = ctx.queue.list()
    assert job.state is JobState.DEAD and job.attempts == 3
    assert job.last_error == "ValueError: bad input #3"
    with ctx.db.session() as s:
        audit = s.execute(select(AuditEvent).where(AuditEvent.event == "job-dead")).scalar_one()
    assert audit.detail["job_id"] == job.id


def test_permanent_error_dead_letters_at_once(ctx: JobContext) -> None:
    def reject(job: Job, _ctx: JobContext) -> None:
        raise PermanentJobError("cannot ever work")

    ctx.queue.enqueue("reject", {})
    drain(Worker(ctx, {"reject": reject}, periodic=False), 0.5, until=settled(ctx))
    [job] = ctx.queue.list()
    assert job.state is JobState.DEAD and job.attempts == 1 and job.last_error == "cannot ever work"


def test_unregistered_kinds_stay_queued(ctx: JobContext) -> None:
    ctx.queue.enqueue("deidentify", {"instance_id": 1})
    drain(Worker(ctx, {"other": lambda j, c: None}, periodic=False), 0.3)
    [job] = ctx.queue.list()
    assert job.state is JobState.QUEUED and job.attempts == 0


def test_heartbeat_holds_the_lease_of_a_long_job(ctx: JobContext) -> None:
    stolen: list[Job | None] = []

    def slow(job: Job, c: JobContext) -> None:
        time.sleep(1.2)  # three lease periods
        stolen.append(c.queue.lease("thief", ["slow"], 10))

    ctx.queue.enqueue("slow", {})
    drain(Worker(ctx, {"slow": slow}, periodic=False), 1.6, until=settled(ctx))
    assert stolen == [None]
    [job] = ctx.queue.list()
    assert job.state is JobState.DONE and job.attempts == 1


def test_periodic_sweeps_run(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[float] = []
    monkeypatch.setitem(
        PERIODIC,
        "test-sweep",
        Sweep("test-sweep", 0.1, JobKind.DEIDENTIFY, lambda c: runs.append(time.monotonic())),
    )
    drain(Worker(ctx, {}, periodic=True), 0.55, until=lambda: len(runs) >= 3)
    assert len(runs) >= 3
    # ... not more often than their interval (a sweep is never run back to back)
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert min(gaps) >= 0.1 * 0.9


def test_release_after_grace(ctx: JobContext) -> None:
    ctx.queue.enqueue("k", {})
    worker = Worker(ctx, {}, periodic=False)
    worker.current = ctx.queue.lease("w", ["k"], 30)
    assert worker.release_current()
    again = ctx.queue.lease("w2", ["k"], 30)
    assert again is not None and again.attempts == 1
