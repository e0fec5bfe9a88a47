"""Receive first while the workers run (issue 19): the write turn shared by every writer of a
SQLite node, worker CPU priority, and batched de-identification that loses nothing on kill -9.

Speed itself is measured by ``tests/benchmarks/bench_receive.py``; these tests check that each
mechanism is in force and correct.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from node.jobs import RECEIVE_STAMP_NAME, JobContext, JobKind, load_handlers
from node.pipeline.deidentify import BATCH_JOBS
from node.worker import Worker
from storage.db import Database
from storage.errors import DatabaseUnavailable
from storage.models import AuditEvent, DeidInstance, Instance
from storage.records import InstanceState, JobState
from storage.turn import ReceiveStamp
from tests.integration.test_deid_pipeline import make_ctx, receive
from tests.support import dicomgen
from tests.support.node import RunningNode, init_node
from tests.unit.deid_support import ct

FORK = mp.get_context("fork")


def _hold_turn(url: str, held: object, release: object) -> None:
    db = Database(url)
    with db.write_turn(priority=True):
        held.set()  # type: ignore[attr-defined]
        release.wait(30)  # type: ignore[attr-defined]
    db.dispose()


def test_the_write_turn_is_one_writer_across_processes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/t.db"
    db = Database(url, busy_timeout_ms=200)
    db.upgrade()
    held, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_turn, args=(url, held, release))
    holder.start()
    try:
        assert held.wait(30)
        # Another process holds the turn: a worker-side transaction gives up after the busy
        # timeout with the error the callers already handle, and writes nothing.
        with pytest.raises(DatabaseUnavailable, match="write turn"):
            with db.session() as s:
                s.execute(text("INSERT INTO node_meta (name, value, updated_at) "
                               "VALUES ('x', 'y', CURRENT_TIMESTAMP)"))
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    with db.session() as s:  # free again
        s.execute(text("INSERT INTO node_meta (name, value, updated_at) "
                       "VALUES ('x', 'y', CURRENT_TIMESTAMP)"))
    with db.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM node_meta")).scalar() == 1
    db.dispose()


def test_an_idle_report_sweep_takes_no_write_turn(tmp_path: Path) -> None:
    # The results lane sweeps every [export] sweep_seconds (2 s); with nothing to report it
    # must not take the write turn the SCP's commits wait for.
    from node.pipeline.report import report_sweep

    ctx = make_ctx(tmp_path)
    held, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_turn,
                          args=(ctx.db.engine.url.render_as_string(False), held, release))
    holder.start()
    try:
        assert held.wait(30)
        assert not any(report_sweep(ctx).values())  # no DatabaseUnavailable: no turn taken
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0


def test_a_priority_writer_gives_up_on_a_stuck_turn(tmp_path: Path) -> None:
    """A writer that stopped while holding the turn (a CLI suspended with Ctrl-Z) makes the
    SCP's priority write refuse after the busy timeout (the SCP answers 0xA700), not hang."""
    url = f"sqlite:///{tmp_path}/t.db"
    db = Database(url, busy_timeout_ms=300)
    db.upgrade()
    held, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_turn, args=(url, held, release))
    holder.start()
    try:
        assert held.wait(30)
        with pytest.raises(DatabaseUnavailable, match="write turn"):
            with db.write_turn(priority=True):
                pass
    finally:
        release.set()
        holder.join(30)
    with db.write_turn(priority=True):  # and takes it once it is free
        assert db.turn is not None and db.turn.held
    db.dispose()


def test_transactions_take_the_turn_and_nest_within_it(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/t.db")
    db.upgrade()
    assert db.turn is not None
    with db.session():
        pass
    assert (tmp_path / "t.db-turn").exists()  # the first write created the turn file
    with db.write_turn(priority=True):
        assert db.turn.held
        with db.transaction() as conn:  # the SCP's transaction inside its priority turn
            assert db.turn.held
            conn.execute(text("SELECT 1"))
        assert db.turn.held
    assert not db.turn.held
    with db.session():
        assert db.turn.held
    assert not db.turn.held
    with db.read():  # reads take no turn
        assert not db.turn.held
    db.dispose()


def test_postgresql_has_no_turn(pg_url: str) -> None:
    db = Database(pg_url)
    assert db.turn is None
    with db.write_turn(priority=True):
        pass
    db.dispose()


def _can_raise_priority() -> bool:
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    try:
        os.setpriority(os.PRIO_PROCESS, tid, before + 1)
        os.setpriority(os.PRIO_PROCESS, tid, before)
    except OSError:
        return False
    return os.getpriority(os.PRIO_PROCESS, tid) == before == 0


def test_a_low_priority_thread_holds_the_turn_at_normal_priority(tmp_path: Path) -> None:
    if not _can_raise_priority():
        pytest.skip("this process may not raise a thread's priority back (RLIMIT_NICE)")
    db = Database(f"sqlite:///{tmp_path}/t.db")
    db.upgrade()
    seen: dict[str, int] = {}

    def worker_thread() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 10)  # as a worker process runs (workers.nice)
        with db.session():
            seen["holding"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join(30)
    assert seen == {"holding": 0, "after": 10}
    db.dispose()


def _nice_of(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of proc(5), after pid and comm


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.parametrize("nice", [None, 3])
def test_serve_runs_the_workers_at_their_nice_and_the_scp_at_normal(
    tmp_path: Path, nice: int | None
) -> None:
    node = init_node(tmp_path / "n")
    env = {} if nice is None else {"FEDNODE_WORKERS__NICE": str(nice)}
    expected = 10 if nice is None else nice  # the default fednode init writes
    with RunningNode(node, workers=1, processes=2, env=env) as running:
        # The node's children: 2 SCP processes and one worker per lane (2 lanes); a worker
        # lowers its priority once it has opened its database (wait for that, up to 60 s).
        stop = threading.Event()
        for _ in range(600):
            nices = sorted(_nice_of(pid) for pid in _children(running.proc.pid))
            if nices.count(expected) >= 2:
                break
            stop.wait(0.1)
        assert nices.count(expected) == 2, nices
        assert nices.count(0) >= 2, nices
        assert _nice_of(running.proc.pid) == 0
        running.stop()


def _worker_dies_at(root: str, step: str) -> None:
    """A worker process that kills itself with SIGKILL at *step* of its first batch."""
    from node.pipeline import deidentify

    ctx = make_ctx(Path(root))
    load_handlers()
    real_commit, real_finish = deidentify._commit, deidentify._finish

    def commit(c: JobContext, items: list, jobs: list | None = None) -> list[bool]:  # type: ignore[type-arg]
        if step == "before-commit":
            os.kill(os.getpid(), signal.SIGKILL)
        completed = real_commit(c, items, jobs)
        if step == "after-commit":
            os.kill(os.getpid(), signal.SIGKILL)
        return completed

    deidentify._commit = commit  # type: ignore[assignment]
    deidentify._finish = real_finish
    fast = ctx.settings.workers.model_copy(update={"lease_seconds": 1.0, "poll_seconds": 0.02})
    ctx.settings = ctx.settings.model_copy(update={"workers": fast})
    Worker(ctx, load_handlers(), kinds=[JobKind.DEIDENTIFY], periodic=False).run()


@pytest.mark.parametrize("step", ["before-commit", "after-commit"])
def test_a_batch_killed_mid_way_loses_nothing_and_records_each_instance_once(
    tmp_path: Path, step: str
) -> None:
    ctx = make_ctx(tmp_path)
    study = dicomgen.FakeStudy()
    ids = [receive(ctx, ct(study, index=i)) for i in range(6)]
    proc = FORK.Process(target=_worker_dies_at, args=(str(tmp_path), step))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    with ctx.db.read() as conn:
        jobs = dict(conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
        states = set(conn.execute(select(Instance.state)).scalars())
    if step == "before-commit":
        # The whole batch was leased at once and is held by the dead worker; nothing recorded.
        assert jobs == {"leased": 6}
        assert states == {InstanceState.RECEIVED.value}
    else:
        # Recorded and completed in one transaction; only the spool records are left over
        # (the kill came before they were deleted), which the re-run below must not mind.
        assert jobs == {"done": 6}
        assert states == {InstanceState.DEIDENTIFIED.value}
    # A fresh worker takes the batch over once the leases expire and finishes every job.
    if step == "after-commit":  # the orphan sweep's business: spool records of done rows
        from node.pipeline.deidentify import remove_orphan_spool

        assert remove_orphan_spool(ctx, older_than_seconds=0) == 6
    fast = ctx.settings.workers.model_copy(update={"lease_seconds": 1.0, "poll_seconds": 0.05})
    ctx.settings = ctx.settings.model_copy(update={"workers": fast})
    worker = Worker(ctx, load_handlers(), kinds=[JobKind.DEIDENTIFY], periodic=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        for _ in range(600):
            counts = ctx.queue.counts()
            if counts.get((JobKind.DEIDENTIFY.value, JobState.DONE), 0) == 6:
                break
            worker.stop.wait(0.05)
    finally:
        worker.stop.set()
        thread.join(30)
    assert ctx.queue.counts().get((JobKind.DEIDENTIFY.value, JobState.DONE), 0) == 6
    with ctx.db.read() as conn:
        rows = conn.execute(select(Instance.id, Instance.state, Instance.spool_name)).all()
        deid = conn.execute(select(func.count()).select_from(DeidInstance)).scalar()
        audits = conn.execute(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.event == "deidentified")
        ).scalar()
    assert sorted(r.id for r in rows) == sorted(ids)
    assert {r.state for r in rows} == {InstanceState.DEIDENTIFIED.value}
    assert deid == 6 and audits == 6  # each instance recorded exactly once
    for r in rows:
        assert not ctx.spool.exists(r.spool_name)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_scp_commit_tells_the_workers_that_receive_is_under_way(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    from node.jobs import JobContext
    from storage.queue import SqlQueue

    ctx = make_ctx(tmp_path)
    if database == "postgresql":
        db = Database(request.getfixturevalue("pg_url"))
        db.upgrade()
        ctx = JobContext(settings=ctx.settings, db=db, queue=SqlQueue(db), keys=ctx.keys)
    worker = JobContext(settings=ctx.settings, db=ctx.db, queue=ctx.queue, keys=ctx.keys)
    assert worker.receive_stamp.last() is None and not worker.receive_stamp.active(60)
    with ctx.db.session():  # a worker's own transaction is not receive
        pass
    assert not worker.receive_stamp.active(60)
    receive(ctx, ct(dicomgen.FakeStudy()))  # the SCP's path: group commit, then the stamp
    assert worker.receive_stamp.active(60)
    assert not worker.receive_stamp.active(0)  # only within the window asked for
    ctx.db.dispose()


def _policy_of(tid: int) -> int:
    return os.sched_getscheduler(tid)


def _may_leave_sched_idle() -> bool:
    from storage.turn import may_leave_idle

    return may_leave_idle()


def test_an_idle_policy_thread_holds_the_turn_at_normal_policy(tmp_path: Path) -> None:
    if not _may_leave_sched_idle():
        pytest.skip("this process may not leave SCHED_IDLE (RLIMIT_NICE)")
    from storage.turn import run_idle

    db = Database(f"sqlite:///{tmp_path}/t.db")
    db.upgrade()
    seen: dict[str, int] = {}

    def worker_thread() -> None:
        assert run_idle(True)  # as a worker runs while the SCP is receiving
        seen["before"] = _policy_of(0)
        with db.session():
            seen["holding"] = _policy_of(0)
        seen["after"] = _policy_of(0)
        assert run_idle(False)
        seen["back"] = _policy_of(0)

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join(30)
    assert seen == {"before": os.SCHED_IDLE, "holding": os.SCHED_OTHER,
                    "after": os.SCHED_IDLE, "back": os.SCHED_OTHER}
    db.dispose()


@pytest.mark.parametrize("idle_while_receiving", [True, False])
def test_workers_run_under_sched_idle_only_while_the_scp_is_receiving(
    tmp_path: Path, idle_while_receiving: bool
) -> None:
    if not _may_leave_sched_idle():
        pytest.skip("this process may not leave SCHED_IDLE (RLIMIT_NICE)")
    ctx = make_ctx(tmp_path)
    workers = ctx.settings.workers.model_copy(
        update={"poll_seconds": 0.02, "idle_while_receiving": idle_while_receiving,
                "defer_while_receiving_seconds": 0.0})  # work beside the receiver
    ctx.settings = ctx.settings.model_copy(update={"workers": workers})
    worker = Worker(ctx, load_handlers(), kinds=[JobKind.DEIDENTIFY], periodic=False)
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        worker.run()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        stop = threading.Event()
        policies = set()
        for _ in range(100):  # a commit of the SCP every 20 ms for 2 s: receive under way
            receive(ctx, ct(dicomgen.FakeStudy()))
            policies.add(_policy_of(tids[0]))
            stop.wait(0.02)
        for _ in range(200):  # then quiet: back to the normal policy (at workers.nice)
            if _policy_of(tids[0]) == os.SCHED_OTHER:
                break
            stop.wait(0.05)
        after = _policy_of(tids[0])
    finally:
        worker.stop.set()
        thread.join(30)
    if idle_while_receiving:
        assert os.SCHED_IDLE in policies
    else:
        assert policies == {os.SCHED_OTHER}
    assert after == os.SCHED_OTHER


def test_a_workers_io_threads_run_at_the_policy_of_the_thread_that_hands_them_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduling policy belongs to one thread: the spool reads and blob writes a batch
    hands to its I/O threads (and the decryption and encryption in them) must run under
    SCHED_IDLE while the worker does, not at ``workers.nice`` beside the receiver."""
    if not _may_leave_sched_idle():
        pytest.skip("this process may not leave SCHED_IDLE (RLIMIT_NICE)")
    from node.pipeline.deidentify import OVERLAP_BYTES, _BatchIO
    from storage.turn import run_idle

    ctx = make_ctx(tmp_path)
    data = os.urandom(OVERLAP_BYTES + 1000)
    locator = ctx.spool.put(data)
    ctx.spool.sync()
    seen: list[tuple[str, int]] = []
    get_live, append = ctx.spool.get_live, ctx.blobs.append

    def reading(name: str) -> bytes | None:
        seen.append(("read", os.sched_getscheduler(0)))
        return get_live(name)

    def writing(blob: bytes) -> str:
        seen.append(("write", os.sched_getscheduler(0)))
        return append(blob)

    monkeypatch.setattr(ctx.spool, "get_live", reading)
    monkeypatch.setattr(ctx.blobs, "append", writing)
    io = _BatchIO()
    results: list[object] = []

    def worker_thread() -> None:
        for idle in (True, False):
            assert run_idle(idle)
            read = io.read(ctx, (1, InstanceState.RECEIVED.value, locator))  # type: ignore[arg-type]
            assert read is not None
            results.append(read.result(30))
            ref = io.write(ctx, data).result(30)
            results.append(ctx.blobs.get(ref))

    t = threading.Thread(target=worker_thread)
    t.start()
    t.join(60)
    assert results == [data] * 4
    assert seen == [("read", os.SCHED_IDLE), ("write", os.SCHED_IDLE),
                    ("read", os.SCHED_OTHER), ("write", os.SCHED_OTHER)]


def _deidentified(ctx: JobContext, ids: list[int]) -> int:
    with ctx.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(Instance).where(
            Instance.id.in_(ids), Instance.state == InstanceState.DEIDENTIFIED.value)).scalar_one())


@pytest.mark.parametrize("window", [30.0, 0.5])
def test_workers_wait_for_a_pause_in_the_burst_for_at_most_the_deferral_window(
    tmp_path: Path, window: float
) -> None:
    ctx = make_ctx(tmp_path)
    workers = ctx.settings.workers.model_copy(
        update={"poll_seconds": 0.02, "defer_while_receiving_seconds": window})
    ctx.settings = ctx.settings.model_copy(update={"workers": workers})
    ids = [receive(ctx, ct(dicomgen.FakeStudy())) for _ in range(BATCH_JOBS)]  # a full batch
    stamp = ReceiveStamp(ctx.settings.data_dir / RECEIVE_STAMP_NAME)
    stamp.mark()  # the SCP is committing: every 10 ms, as in a burst, for 2.5 s
    worker = Worker(ctx, load_handlers(), kinds=[JobKind.DEIDENTIFY], periodic=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        pause = threading.Event()
        for _ in range(250):
            stamp.mark()
            pause.wait(0.01)
        during = _deidentified(ctx, ids)
        for _ in range(300):  # the burst is over: the backlog goes at once
            if _deidentified(ctx, ids) == len(ids):
                break
            pause.wait(0.1)
        after = _deidentified(ctx, ids)
    finally:
        worker.stop.set()
        thread.join(60)
    if window > 2.5:
        assert during == 0  # nothing beside the receiver while it received
    else:
        assert during == len(ids)  # behind for longer than the window: it went on anyway
    assert after == len(ids)


def test_an_idle_ingest_worker_wakes_on_the_scps_commit_not_a_poll_later(
    tmp_path: Path,
) -> None:
    ctx = make_ctx(tmp_path)
    slow = ctx.settings.workers.model_copy(update={"poll_seconds": 60.0})
    ctx.settings = ctx.settings.model_copy(update={"workers": slow})
    worker = Worker(ctx, load_handlers(), kinds=[JobKind.DEIDENTIFY], periodic=False)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        stop = threading.Event()
        stop.wait(0.3)  # the worker found nothing and waits (a poll is 60 s away)
        instance_id = receive(ctx, ct(dicomgen.FakeStudy()))
        for _ in range(300):  # 30 s at most, half a poll period
            with ctx.db.read() as conn:
                state = conn.execute(
                    select(Instance.state).where(Instance.id == instance_id)).scalar_one()
            if state == InstanceState.DEIDENTIFIED.value:
                break
            stop.wait(0.1)
    finally:
        worker.stop.set()
        thread.join(90)
    assert state == InstanceState.DEIDENTIFIED.value


def test_the_deidentify_warm_up_leaves_nothing_behind(tmp_path: Path) -> None:
    from node.pipeline.deidentify import warm_up

    ctx = make_ctx(tmp_path)
    load_handlers()
    warm_up(ctx)
    warm_up(ctx)  # again: still nothing
    with ctx.db.read() as conn:
        counts = {
            table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in ("studies", "series", "deid_instances", "vault_studies",
                          "vault_instances", "audit_events", "jobs")
        }
    assert set(counts.values()) == {0}, counts
    assert not ctx.db.turn.held  # type: ignore[union-attr]
