"""Job kinds, typed payloads and worker lanes (node/jobs.py, node/worker.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from node.config import ConfigError, WorkersSection, load_settings
from node.config_template import render
from node.jobs import (
    PAYLOADS,
    DeidentifyPayload,
    ExportPayload,
    InferPayload,
    JobContext,
    JobKind,
    PermanentJobError,
    ReportPayload,
    enqueue,
    lane_depths,
    parse_payload,
    register,
)
from node.keys import NodeKeys
from node.worker import Worker
from storage.db import Database
from storage.errors import DatabaseUnavailable
from storage.queue import SqlQueue
from storage.records import Job, JobState


@pytest.fixture
def ctx(tmp_path: Path, sqlite_db: Database) -> JobContext:
    cfg = tmp_path / "fednode.toml"
    cfg.write_text(render())
    settings = load_settings(cfg)
    fast = settings.workers.model_copy(
        update={"lease_seconds": 5.0, "poll_seconds": 0.02, "backoff_seconds": 0.05}
    )
    return JobContext(
        settings=settings.model_copy(update={"workers": fast}),
        db=sqlite_db,
        queue=SqlQueue(sqlite_db, default_max_attempts=3),
        keys=NodeKeys.from_master(os.urandom(32)),
    )


def test_every_queued_kind_has_a_payload_that_round_trips() -> None:
    samples = [
        DeidentifyPayload(7),
        InferPayload("2.25.1", 2, "chest_xray", "1.0", ("2.25.2", "2.25.3")),
        ReportPayload(11),
        ExportPayload(12, "pacs"),
    ]
    assert {type(p) for p in samples} == set(PAYLOADS.values())
    for payload in samples:
        assert parse_payload(payload.KIND, payload.to_json()) == payload


@pytest.mark.parametrize(
    ("kind", "data", "message"),
    [
        ("deidentify", {}, "has no instance_id"),
        ("deidentify", {"instance_id": "7"}, "instance_id is not of type int"),
        ("deidentify", {"instance_id": True}, "instance_id is not of type int"),
        ("deidentify", {"instance_id": 7, "x": 1}, "unknown field"),
        ("infer", {"study_key": "k", "study_version": 1, "task": "t", "task_version": "1",
                   "sop_keys": "k"}, "sop_keys is not a list"),
        ("nonsense", {}, "no payload type"),
    ],
)
def test_a_bad_payload_is_refused_naming_the_field(kind: str, data: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(PermanentJobError, match=message):
        parse_payload(kind, data)


def test_a_job_with_a_bad_payload_is_dead_lettered_without_running(ctx: JobContext) -> None:
    ran: list[int] = []

    def handle(job: Job, payload: DeidentifyPayload, c: JobContext) -> None:
        ran.append(payload.instance_id)

    from node.jobs import Handler

    handler = Handler(JobKind.DEIDENTIFY, handle)
    ctx.queue.enqueue(JobKind.DEIDENTIFY, {"instance_id": "not a number"})
    enqueue(ctx.queue, DeidentifyPayload(5))
    worker = Worker(ctx, {JobKind.DEIDENTIFY: handler}, periodic=False)
    while (job := ctx.queue.lease("t", [JobKind.DEIDENTIFY], 5)) is not None:
        worker.run_one(job)
    states = sorted((j.id, j.state, j.last_error) for j in ctx.queue.list())
    assert states[0][1] is JobState.DEAD and "instance_id is not of type int" in states[0][2]
    assert states[1][1] is JobState.DONE and ran == [5]


def test_registering_a_second_handler_for_a_kind_is_refused() -> None:
    from node.jobs import REGISTRY

    saved = dict(REGISTRY)
    try:
        REGISTRY.clear()

        @register(JobKind.EXPORT)
        def first(job: Job, payload: ExportPayload, c: JobContext) -> None:
            return None

        with pytest.raises(ValueError, match="registered already"):

            @register(JobKind.EXPORT)
            def second(job: Job, payload: ExportPayload, c: JobContext) -> None:
                return None
    finally:
        REGISTRY.clear()
        REGISTRY.update(saved)


def test_a_blocked_lane_does_not_delay_another_lane(ctx: JobContext) -> None:
    """An ``infer`` handler blocked for the whole test holds its lane only."""
    release = threading.Event()
    started = threading.Event()
    done_at: list[float] = []

    def slow_infer(job: Job, c: JobContext) -> None:
        started.set()
        release.wait(30)  # blocks until the test ends

    def quick_deid(job: Job, c: JobContext) -> None:
        done_at.append(time.monotonic())

    handlers = {JobKind.INFER: slow_infer, JobKind.DEIDENTIFY: quick_deid}
    lanes = ctx.settings.workers.lanes
    results = Worker(ctx, handlers, kinds=lanes["results"].kinds, name="results", periodic=False)
    ingest = Worker(ctx, handlers, kinds=lanes["ingest"].kinds, name="ingest", periodic=False)
    for i in range(3):
        ctx.queue.enqueue(JobKind.INFER, {"n": i})
    threads = [threading.Thread(target=w.run) for w in (results, ingest)]
    for t in threads:
        t.start()
    try:
        assert started.wait(10), "the infer lane never started its job"
        t0 = time.monotonic()
        for i in range(20):
            ctx.queue.enqueue(JobKind.DEIDENTIFY, {"instance_id": i})
        deadline = time.monotonic() + 10
        while len(done_at) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(done_at) == 20, "de-identification waited behind the blocked infer lane"
        assert max(done_at) - t0 < 5
        counts = ctx.queue.counts()
        depth = {d.name: d for d in lane_depths(ctx.settings.workers, counts)}
        assert depth["results"].running == 1 and depth["results"].queued == 2
        assert depth["ingest"].running == 0 and depth["ingest"].queued == 0
        assert not release.is_set()  # the infer job was blocked throughout
    finally:
        release.set()
        for w in (results, ingest):
            w.stop.set()
        for t in threads:
            t.join(10)
    assert all(not t.is_alive() for t in threads)


def test_a_lane_runs_only_its_own_sweeps(ctx: JobContext, monkeypatch: pytest.MonkeyPatch) -> None:
    from node.jobs import PERIODIC, Sweep

    runs: list[str] = []
    monkeypatch.setitem(PERIODIC, "t-ingest",
                        Sweep("t-ingest", 0.01, JobKind.ASSEMBLE, lambda c: runs.append("ingest")))
    monkeypatch.setitem(PERIODIC, "t-export",
                        Sweep("t-export", 0.01, JobKind.EXPORT, lambda c: runs.append("export")))
    Worker(ctx, {}, kinds=["deidentify", "assemble"]).run_periodic()
    assert "ingest" in runs and "export" not in runs


def test_a_database_error_recording_the_outcome_does_not_stop_the_worker(
    ctx: JobContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx.queue.enqueue("k", {})
    job = ctx.queue.lease("w", ["k"], 5)
    assert job is not None

    def down(*args: object, **kwargs: object) -> bool:
        raise DatabaseUnavailable("database unavailable") from OperationalError("x", {}, None)

    monkeypatch.setattr(ctx.queue, "complete", down)
    worker = Worker(ctx, {"k": lambda j, c: None}, periodic=False)
    assert worker.run_one(job) is None  # no exception escapes: the lease expires, it runs again
    monkeypatch.setattr(ctx.queue, "fail", down)
    worker = Worker(ctx, {"k": lambda j, c: (_ for _ in ()).throw(RuntimeError("x"))},
                    periodic=False)
    assert worker.run_one(job) is None


def test_lanes_config_defaults_and_validation(tmp_path: Path) -> None:
    lanes = WorkersSection().lanes
    assert lanes["ingest"].kinds == ["deidentify", "assemble"] and lanes["ingest"].count == 2
    assert lanes["results"].kinds == ["infer", "report", "export"]
    assert WorkersSection().with_count(0).count == 0

    def load(text: str) -> None:
        cfg = tmp_path / "fednode.toml"
        cfg.write_text(text)
        load_settings(cfg)

    with pytest.raises(ConfigError, match=r"no lane serves job kind.*report, export"):
        load('[workers.lanes.all]\nkinds = ["deidentify", "assemble", "infer"]\n')
    with pytest.raises(ConfigError, match="'infer' is in lanes"):
        load('[workers.lanes.a]\nkinds = ["deidentify", "assemble", "infer"]\n'
             '[workers.lanes.b]\nkinds = ["infer", "report", "export"]\n')
    with pytest.raises(ConfigError, match="unknown: 'train'"):
        load('[workers.lanes.a]\nkinds = ["train"]\n')
    with pytest.raises(ConfigError, match="workers"):
        load('[workers.lanes.a]\nkinds = ["deidentify", "assemble", "infer", "report", "export"]\n'
             "count = -1\n")


def test_a_lane_with_batched_and_single_kinds_serves_both(ctx: JobContext) -> None:
    """Batched de-identification does not starve an ``infer`` job in the same lane."""
    from node.jobs import Handler

    batched = Handler(JobKind.DEIDENTIFY, lambda job, payload, c: None)
    batched.max_batch = 8
    worker = Worker(ctx, {JobKind.DEIDENTIFY: batched, JobKind.INFER: lambda j, c: None},
                    periodic=False)
    for i in range(40):
        enqueue(ctx.queue, DeidentifyPayload(i))
    ctx.queue.enqueue(JobKind.INFER, {"n": 1})
    kinds = sorted(worker.handlers)
    first, second = worker._lease(kinds), worker._lease(kinds)
    leased = [j.kind for j in first + second]
    assert leased.count(JobKind.INFER) == 1
    assert leased.count(JobKind.DEIDENTIFY) == 8
