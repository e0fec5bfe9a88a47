"""The job queue contract, run against SQLite, PostgreSQL and the in-memory queue."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from storage.db import Database
from storage.queue import JobQueue, MemoryQueue, SqlQueue
from storage.records import JobState


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str | None]]:
    """(kind, database URL or None for memory)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'q.db'}"
        Database(url).upgrade()
        yield "sqlite", url
    elif request.param == "postgresql":
        yield "postgresql", request.getfixturevalue("pg_url")
    else:
        yield "memory", None


@pytest.fixture
def queue(backend: tuple[str, str | None]) -> Iterator[JobQueue]:
    kind, url = backend
    if url is None:
        yield MemoryQueue(default_max_attempts=3)
        return
    db = Database(url)
    if kind == "postgresql":
        db.upgrade()
    yield SqlQueue(db, default_max_attempts=3)
    db.dispose()


def test_enqueue_lease_complete(queue: JobQueue) -> None:
    job_id = queue.enqueue("deidentify", {"instance_id": 7})
    assert job_id is not None
    job = queue.lease("w1", ["deidentify"], 30)
    assert job is not None and job.id == job_id
    assert job.state is JobState.LEASED and job.attempts == 1 and job.payload == {"instance_id": 7}
    assert queue.lease("w2", ["deidentify"], 30) is None  # leased jobs are not handed out twice
    assert queue.complete(job)
    assert queue.list(state=JobState.DONE)[0].id == job_id
    assert queue.lease("w1", ["deidentify"], 30) is None


def test_lease_filters_by_kind(queue: JobQueue) -> None:
    queue.enqueue("infer", {})
    assert queue.lease("w", ["deidentify"], 30) is None
    assert queue.lease("w", [], 30) is None
    job = queue.lease("w", ["deidentify", "infer"], 30)
    assert job is not None and job.kind == "infer"


def test_dedupe_key_gives_one_job(queue: JobQueue) -> None:
    first = queue.enqueue("deidentify", {"n": 1}, dedupe_key="deidentify:2.25.1")
    second = queue.enqueue("deidentify", {"n": 2}, dedupe_key="deidentify:2.25.1")
    assert first is not None and second is None
    assert sum(queue.counts().values()) == 1


def test_fail_retries_after_backoff_then_dead(queue: JobQueue) -> None:
    queue.enqueue("k", {})
    job = queue.lease("w", ["k"], 30)
    assert job is not None
    assert queue.fail(job, "boom 1", retry_in=0.3) is JobState.QUEUED
    assert queue.lease("w", ["k"], 30) is None  # not due yet
    time.sleep(0.35)
    job = queue.lease("w", ["k"], 30)
    assert job is not None and job.attempts == 2 and job.last_error == "boom 1"
    assert queue.fail(job, "boom 2", retry_in=None) is JobState.DEAD
    [dead] = queue.list(state=JobState.DEAD)
    assert dead.last_error == "boom 2" and dead.attempts == 2
    assert queue.lease("w", ["k"], 30) is None


def test_retry_requeues_dead_jobs_with_fresh_budget(queue: JobQueue) -> None:
    a = queue.enqueue("k", {})
    b = queue.enqueue("k", {})
    for _ in range(2):
        job = queue.lease("w", ["k"], 30)
        assert job is not None
        queue.fail(job, "nope", retry_in=None)
    assert queue.retry([a]) == 1  # type: ignore[list-item]
    job = queue.lease("w", ["k"], 30)
    assert job is not None and job.id == a and job.attempts == 1
    assert queue.retry() == 1
    assert queue.counts()[("k", JobState.QUEUED)] == 1
    assert b is not None


def test_expired_lease_is_taken_over_and_old_holder_is_fenced(queue: JobQueue) -> None:
    queue.enqueue("k", {})
    stale = queue.lease("w1", ["k"], 0.2)
    assert stale is not None
    time.sleep(0.3)
    fresh = queue.lease("w2", ["k"], 30)
    assert fresh is not None and fresh.id == stale.id and fresh.attempts == 2
    # The first worker comes back after its lease expired: it can no longer decide the outcome.
    assert not queue.complete(stale)
    assert queue.fail(stale, "late", retry_in=None) is None
    assert not queue.heartbeat(stale, 30)
    assert queue.complete(fresh)


def test_expired_lease_on_last_attempt_is_dead_lettered(queue: JobQueue) -> None:
    queue.enqueue("k", {}, max_attempts=1)
    job = queue.lease("w1", ["k"], 0.1)
    assert job is not None
    time.sleep(0.2)
    assert queue.lease("w2", ["k"], 30) is None
    [dead] = queue.list(state=JobState.DEAD)
    assert "lease expired" in (dead.last_error or "")


def test_heartbeat_keeps_the_lease(queue: JobQueue) -> None:
    queue.enqueue("k", {})
    job = queue.lease("w1", ["k"], 0.3)
    assert job is not None
    for _ in range(3):
        time.sleep(0.15)
        assert queue.heartbeat(job, 0.3)
    assert queue.lease("w2", ["k"], 30) is None


def test_release_gives_the_job_back_without_spending_an_attempt(queue: JobQueue) -> None:
    queue.enqueue("k", {})
    job = queue.lease("w1", ["k"], 30)
    assert job is not None and queue.release(job)
    again = queue.lease("w2", ["k"], 30)
    assert again is not None and again.attempts == 1


def test_purge_only_finished_states(queue: JobQueue) -> None:
    queue.enqueue("k", {})
    queue.enqueue("k", {})
    job = queue.lease("w", ["k"], 30)
    assert job is not None and queue.complete(job)
    with pytest.raises(ValueError):
        queue.purge(JobState.QUEUED)
    assert queue.purge(JobState.DONE, older_than=timedelta(days=1)) == 0
    assert queue.purge(JobState.DONE) == 1
    assert queue.counts() == {("k", JobState.QUEUED): 1}


def test_list_newest_first_and_filters(queue: JobQueue) -> None:
    ids = [queue.enqueue("a" if i % 2 else "b", {"i": i}) for i in range(5)]
    listed = queue.list()
    assert [j.id for j in listed] == sorted(ids, reverse=True)  # type: ignore[type-var]
    assert {j.kind for j in queue.list(kind="a")} == {"a"}
    assert len(queue.list(limit=2)) == 2


def _race_worker(url: str, owner: str, out: mp.Queue) -> None:  # type: ignore[type-arg]
    db = Database(url)
    q = SqlQueue(db)
    seen = []
    idle = 0
    while idle < 5:
        job = q.lease(owner, ["race"], 60)
        if job is None:
            idle += 1
            time.sleep(0.02)
            continue
        idle = 0
        seen.append(job.payload["n"])
        time.sleep(0.002)  # the work: lets the other worker interleave
        assert q.complete(job)
    out.put(seen)
    db.dispose()


def test_two_workers_racing_never_double_process(
    queue: JobQueue, backend: tuple[str, str | None]
) -> None:
    total = 200
    for n in range(total):
        queue.enqueue("race", {"n": n})
    _, url = backend
    results: list[list[int]] = []
    if url is None:  # in memory: two threads
        lock = threading.Lock()

        start = threading.Barrier(2)

        def run(owner: str) -> None:
            seen = []
            start.wait()
            while (job := queue.lease(owner, ["race"], 60)) is not None:
                seen.append(job.payload["n"])
                time.sleep(0.002)  # the work: lets the other worker interleave
                assert queue.complete(job)
            with lock:
                results.append(seen)

        threads = [threading.Thread(target=run, args=(f"t{i}",)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    else:  # two processes, each with its own engine
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [ctx.Process(target=_race_worker, args=(url, f"p{i}", out)) for i in range(2)]
        for p in procs:
            p.start()
        results = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    processed = [n for seen in results for n in seen]
    assert sorted(processed) == list(range(total)), "every job exactly once"
    assert all(results), "both workers got work (a real race)"
    assert queue.counts() == {("race", JobState.DONE): total}
