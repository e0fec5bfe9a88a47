"""A worker survives a database error while recording a job's outcome (issue 18, item 6)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node.config import load_settings
from node.config_template import render
from node.jobs import JobContext
from node.keys import NodeKeys
from node.worker import Worker
from storage.db import Database
from storage.errors import DatabaseUnavailable
from storage.queue import SqlQueue
from storage.records import Job, JobState


class _FlakyOutcomes(SqlQueue):
    """complete() and fail() meet a database error the first time each is called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broken = {"complete", "fail"}

    def complete(self, job: Job, *args: Any, **kwargs: Any) -> Any:
        if "complete" in self.broken:
            self.broken.discard("complete")
            raise DatabaseUnavailable("database sqlite unavailable: OperationalError")
        return super().complete(job, *args, **kwargs)

    def fail(self, job: Job, *args: Any, **kwargs: Any) -> Any:
        if "fail" in self.broken:
            self.broken.discard("fail")
            raise DatabaseUnavailable("database sqlite unavailable: OperationalError")
        return super().fail(job, *args, **kwargs)


@pytest.fixture
def ctx(tmp_path: Path, sqlite_db: Database) -> JobContext:
    cfg = tmp_path / "fednode.toml"
    cfg.write_text(render())
    settings = load_settings(cfg)
    fast = settings.workers.model_copy(
        update={"backoff_seconds": 0.05, "backoff_max_seconds": 0.1, "max_attempts": 5,
                "lease_seconds": 0.4, "poll_seconds": 0.02}
    )
    return JobContext(
        settings=settings.model_copy(update={"workers": fast}),
        db=sqlite_db,
        queue=_FlakyOutcomes(sqlite_db, default_max_attempts=5),
        keys=NodeKeys.from_master(os.urandom(32)),
    )


def test_worker_keeps_running_when_recording_an_outcome_fails(ctx: JobContext) -> None:
    runs: list[str] = []

    def ok(job: Job, _ctx: JobContext) -> None:
        runs.append("ok")

    def flaky(job: Job, _ctx: JobContext) -> None:
        runs.append("flaky")
        if runs.count("flaky") == 1:
            raise RuntimeError("transient")

    ctx.queue.enqueue("ok", {})
    ctx.queue.enqueue("flaky", {})
    worker = Worker(ctx, {"ok": ok, "flaky": flaky}, periodic=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if all(j.state is JobState.DONE for j in ctx.queue.list()):
            break
        time.sleep(0.05)
    alive = thread.is_alive()
    worker.stop.set()
    thread.join(10)
    assert alive  # the worker did not exit on the database errors
    assert ctx.queue.broken == set()  # both errors were met
    assert [j.state for j in ctx.queue.list()] == [JobState.DONE, JobState.DONE]
    # The job whose completion was lost ran again after its lease (handlers are idempotent).
    assert runs.count("ok") + runs.count("flaky") >= 3
