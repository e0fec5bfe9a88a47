"""The job loop of one worker process: lease, dispatch by kind, retry with backoff, heartbeat,
dead-letter, graceful SIGTERM.

A worker serves the job kinds of one lane (``[workers.lanes.<name>]``): it leases only those
kinds and runs only the periodic sweeps that belong to them (:mod:`node.jobs`).

A handler that returns completes its job. :class:`~node.jobs.PermanentJobError`
dead-letters at once; any other exception is retried after ``backoff_seconds * 2**(attempt-1)``
(capped at ``backoff_max_seconds``, with ±20 % jitter so that failing jobs do not retry in
lock-step) until ``max_attempts``, then dead-lettered with the last error. While a handler runs
a heartbeat thread extends the lease. On SIGTERM the worker finishes the job in hand; if that
takes longer than the grace period it gives the lease back and exits.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from node.config import WorkersSection
from node.jobs import COMPLETED, PERIODIC, Handler, JobContext, JobKind, PermanentJobError
from node.stopflag import StopFlag
from storage.audit import AuditKind
from storage.errors import StorageError
from storage.records import Job, JobState
from storage.turn import run_idle

logger = logging.getLogger(__name__)

RECEIVING_SECONDS = 0.2
"""The SCP is receiving if it committed within this long (see Worker._pace)."""
BURST_SECONDS = 0.03
"""While the SCP committed within this long a burst is under way: workers wait for it to pause
(_deferring), or past the deferral window lease only full batches (_lease). 30 ms rather than
50 ms: de-identification starts 20 ms sooner after a burst, and the receive rate was no lower in a
7-round benchmark."""
WAKE_SECONDS = 0.01
"""How often an idle ingest worker looks at the SCP's commit stamp (see Worker._idle)."""

JobFunction = Callable[[Job, JobContext], None]
"""What the worker calls for a leased job (a registered :class:`node.jobs.Handler` is one)."""


def backoff_delay(attempt: int, base: float, cap: float, *, jitter: float = 0.2) -> float:
    """Seconds to wait before retry number *attempt* (1-based)."""
    delay: float = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return max(0.0, delay * (1 + random.uniform(-jitter, jitter)))


class Worker:
    """Leases and runs jobs of its lane's kinds until :attr:`stop` is set.

    Parameters
    ----------
    ctx : JobContext
        The process's database, queue, keys and stores.
    handlers : mapping of str to callable
        ``handler(job, ctx)`` by job kind: the registered handlers
        (:func:`node.jobs.load_handlers`, which parse the payload) or plain functions.
    kinds : iterable of str, optional
        The kinds this worker serves (its lane's); default: every kind in *handlers*, and every
        sweep. Kinds without a handler are not leased (their jobs wait for a node that has one).
    """

    def __init__(
        self,
        ctx: JobContext,
        handlers: Mapping[str, JobFunction],
        *,
        kinds: Iterable[str] | None = None,
        name: str | None = None,
        periodic: bool = True,
    ) -> None:
        self.ctx = ctx
        self.kinds = None if kinds is None else frozenset(str(k) for k in kinds)
        self.handlers = {
            str(k): h for k, h in handlers.items() if self.kinds is None or k in self.kinds
        }
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.stop = StopFlag()
        self.current: Job | None = None
        self.held: list[Job] = []
        """Every job of the batch in hand that has no outcome yet."""
        self._periodic_due: dict[str, float] = {}
        self._run_periodic = periodic
        self._single_first = True  # flipped before each lease: batched kinds go first
        self._idle_policy = False  # running under SCHED_IDLE (see _pace)
        self._behind_since: float | None = None  # first deferral since it last caught up
        # An idle worker of the kind the SCP enqueues wakes when the SCP commits (see _idle).
        self._wakes_on_receive = JobKind.DEIDENTIFY.value in self.handlers

    @property
    def _cfg(self) -> WorkersSection:
        return self.ctx.settings.workers

    def warm_up(self) -> None:
        """Prepare the queue's lease and completion, then run the warm-up of every kind this
        worker serves (:func:`node.jobs.register_warm_up`)."""
        try:
            self.ctx.queue.prepare()
        except Exception as exc:  # the first lease pays instead
            logger.warning("warm-up of the queue failed: %s: %s", type(exc).__name__, exc)
        for kind, handler in self.handlers.items():
            fn = getattr(handler, "warm_up", None)
            if fn is None:
                continue
            try:
                fn(self.ctx)
            except Exception as exc:  # the first job pays instead
                logger.warning("warm-up of %s failed: %s: %s", kind, type(exc).__name__, exc)

    def run(self) -> None:
        """Loop until :attr:`stop` is set."""
        kinds = sorted(self.handlers)
        logger.info("worker %s started; job kinds: %s", self.name, ", ".join(kinds) or "(none)")
        while not self.stop.is_set():
            seen = self._last_receive()
            if self._deferring(seen):  # the sweeps wait too: they take the write turn
                self._wait_for_pause()
                continue
            if self._run_periodic:
                self.run_periodic()
            self._pace()
            try:
                jobs = self._lease(kinds)
            except StorageError as exc:
                logger.warning("cannot lease jobs: %s", exc)
                self.stop.wait(min(5.0, self._cfg.poll_seconds * 10))
                continue
            if not jobs:
                self._behind_since = None  # caught up (or the rest is not due yet)
                self._idle(seen)
                continue
            self.run_jobs(jobs)
        logger.info("worker %s stopped", self.name)

    def _last_receive(self) -> float | None:
        try:
            return self.ctx.receive_stamp.last()
        except Exception as exc:  # a hint only
            logger.debug("cannot read the SCP's commit stamp: %s", exc)
            return None

    def _deferring(self, seen: float | None) -> bool:
        """Whether to start no job yet: the SCP committed within ``BURST_SECONDS`` (a burst
        is under way) and this worker has not been waiting behind it for
        ``workers.defer_while_receiving_seconds`` since it last caught up. Measured on two
        cores, any work beside the receiver (even under ``SCHED_IDLE``) stretched a burst:
        200 CT instances took 0.44-0.58 s instead of 0.30 s beside one or two spinning
        processes; a burst's backlog is de-identified the moment it pauses."""
        window = self._cfg.defer_while_receiving_seconds
        if window <= 0 or seen is None:
            return False
        now = time.monotonic()
        if now - seen >= BURST_SECONDS:
            return False
        if self._behind_since is None:
            self._behind_since = now
        return now - self._behind_since < window

    def _wait_for_pause(self) -> None:
        """Wait until the SCP's burst pauses (no commit for ``BURST_SECONDS``) or the
        deferral window is over: asleep until the earliest moment either can be true, then
        a look at the commit stamp (about 20 wake-ups a second during a burst, where a 10 ms
        poll of three workers took 300 wake-ups from the receiver's two cores)."""
        window = self._cfg.defer_while_receiving_seconds
        while True:
            now = time.monotonic()
            seen = self._last_receive()
            if seen is None or now - seen >= BURST_SECONDS:
                return
            if self._behind_since is None or now - self._behind_since >= window:
                return
            until = min(seen + BURST_SECONDS, self._behind_since + window)
            if self.stop.wait(max(until - now, 0.0) + 0.001):
                return

    def _pace(self) -> None:
        """While the SCP is receiving (``workers.idle_while_receiving``), run the next
        jobs under ``SCHED_IDLE``: only on CPU time the SCP and its peers leave idle, preempted
        the moment an SCP thread wakes, so that a burst is answered at the rate of a node
        without workers. Otherwise at ``workers.nice``, so that other load on the machine (a
        training run) cannot starve de-identification. The write turn is held at normal
        priority either way (:func:`storage.turn.run_idle`)."""
        if not self._cfg.idle_while_receiving:
            return
        receiving = self._receiving(RECEIVING_SECONDS)
        if receiving != self._idle_policy and (run_idle(receiving) or not receiving):
            self._idle_policy = receiving

    def _receiving(self, within_seconds: float) -> bool:
        try:
            return self.ctx.receive_stamp.active(within_seconds)
        except Exception as exc:  # a hint only
            logger.debug("cannot tell whether the SCP is receiving: %s", exc)
            return False

    def _idle(self, seen: float | None) -> None:
        """No job (or, during a burst, no full batch) was due: wait ``poll_seconds``, or, for
        a worker of ``deidentify`` jobs, only until the SCP commits again (its
        commit stamp moves past *seen*) or its burst pauses, so that a burst is
        de-identified from its first instances on rather than a poll later."""
        if not self._wakes_on_receive:
            self.stop.wait(self._cfg.poll_seconds)
            return
        deadline = time.monotonic() + self._cfg.poll_seconds
        # A partial batch left during a burst (see _lease) goes once the burst pauses.
        burst_end = None if seen is None else seen + BURST_SECONDS
        if burst_end is not None and burst_end <= time.monotonic():
            burst_end = None  # no burst under way
        while not self.stop.wait(min(WAKE_SECONDS, max(deadline - time.monotonic(), 0.0))):
            now = time.monotonic()
            if now >= deadline or self._last_receive() != seen:
                return
            if burst_end is not None and now >= burst_end:
                return

    def _max_batch(self, kind: str) -> int:
        handler = self.handlers.get(kind)
        return int(getattr(handler, "max_batch", 1)) if isinstance(handler, Handler) else 1

    def _lease(self, kinds: list[str]) -> list[Job]:
        """The next jobs to run: a batch of the kinds that have a batch handler, or one job of
        the others. In a lane that serves both, the two are tried first in turn, so that a
        steady stream of batched jobs does not starve the other kinds."""
        lease_seconds = self._cfg.lease_seconds
        batched = [k for k in kinds if self._max_batch(k) > 1]
        single = [k for k in kinds if k not in batched]

        def lease_batch() -> list[Job]:
            if not batched:
                return []
            limit = max(self._max_batch(k) for k in batched)
            # While the SCP is receiving, only a full batch is leased: every batch costs two
            # turns of SQLite's write lock (lease; record and complete), the lock the SCP's
            # commits wait for. Once the burst pauses, whatever is due goes.
            at_least = limit if self._receiving(BURST_SECONDS) else 1
            return self.ctx.queue.lease_many(
                self.name, batched, lease_seconds, limit, at_least=at_least)

        def lease_single() -> list[Job]:
            job = self.ctx.queue.lease(self.name, single, lease_seconds) if single else None
            return [job] if job is not None else []

        self._single_first = not self._single_first
        order = (lease_single, lease_batch) if self._single_first else (lease_batch, lease_single)
        for attempt in order:
            jobs = attempt()
            if jobs:
                return jobs
        return []

    def run_jobs(self, jobs: list[Job]) -> None:
        """Run leased *jobs*: a lone job of a kind without a batch function by
        :meth:`run_one`, the others by kind through the batch function (one job of a batched
        kind too: it completes its job in the transaction that records it, one write turn
        fewer)."""
        if len(jobs) == 1 and self._max_batch(jobs[0].kind) <= 1:
            self.run_one(jobs[0])
            return
        by_kind: dict[str, list[Job]] = {}
        for job in jobs:
            by_kind.setdefault(job.kind, []).append(job)
        for group in by_kind.values():
            try:
                self._run_batch(group)
            except StorageError as exc:
                logger.warning(
                    "a batch of %d %s job(s): cannot record its outcome (%s); they run again "
                    "after their lease", len(group), group[0].kind, exc,
                )

    def run_periodic(self) -> None:
        for name, sweep in PERIODIC.items():
            if self.kinds is not None and sweep.kind not in self.kinds:
                continue
            now = time.monotonic()  # after the sweeps before it: each keeps its interval
            due = self._periodic_due.get(name, 0.0)
            if now < due:
                continue
            self._periodic_due[name] = now + sweep.interval(self.ctx.settings)
            try:
                sweep.fn(self.ctx)
            except Exception as exc:
                logger.error("periodic task %s failed: %s: %s", name, type(exc).__name__, exc)

    def run_one(self, job: Job) -> JobState | None:
        """Run one leased job to its outcome; return the job's new state.

        A database error while recording the outcome (complete, retry, dead letter) does not
        stop the worker: the job keeps its lease until it expires and then runs again (every
        handler is idempotent). ``None`` is returned then.
        """
        try:
            return self._run_one(job)
        except StorageError as exc:
            logger.warning(
                "job %d (%s): cannot record its outcome (%s); it runs again after its lease",
                job.id, job.kind, exc,
            )
            return None

    def _run_one(self, job: Job) -> JobState | None:
        handler = self.handlers.get(job.kind)
        self.current = job
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, beat_stop), daemon=True)
        beat.start()
        started = time.monotonic()
        try:
            if handler is None:
                raise PermanentJobError(f"no handler for job kind {job.kind!r}")
            handler(job, self.ctx)
        except PermanentJobError as exc:
            return self._fail(job, str(exc), permanent=True)
        except Exception as exc:
            return self._fail(job, f"{type(exc).__name__}: {exc}", permanent=False)
        else:
            if self.ctx.queue.complete(job):
                logger.info(
                    "job %d (%s) done in %.3f s", job.id, job.kind, time.monotonic() - started
                )
                return JobState.DONE
            logger.warning("job %d (%s) finished after its lease was lost", job.id, job.kind)
            return None
        finally:
            beat_stop.set()
            self.current = None

    def _run_batch(self, jobs: list[Job]) -> None:
        handler = self.handlers.get(jobs[0].kind)
        if not isinstance(handler, Handler):
            for job in jobs:
                self.run_one(job)
            return
        self.current, self.held = jobs[0], list(jobs)
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat_all, args=(beat_stop,), daemon=True)
        beat.start()
        started = time.monotonic()
        try:
            outcomes = handler.run_batch(jobs, self.ctx)
            pairs = list(zip(jobs, outcomes, strict=True))
            done = [job for job, outcome in pairs if outcome is None]
            completed = dict.fromkeys(
                (job.id for job, outcome in pairs if outcome is COMPLETED), True)
            completed.update(zip((j.id for j in done), self.ctx.queue.complete_many(done),
                                 strict=True))
            for job, _ in pairs:
                if job.id not in completed:
                    continue
                if completed[job.id]:
                    logger.info("job %d (%s) done in a batch of %d in %.3f s",
                                job.id, job.kind, len(jobs), time.monotonic() - started)
                else:
                    logger.warning("job %d (%s) finished after its lease was lost",
                                   job.id, job.kind)
            self.held = [job for job, outcome in pairs if isinstance(outcome, BaseException)]
            for job, outcome in pairs:
                if not isinstance(outcome, BaseException):
                    continue
                if isinstance(outcome, PermanentJobError):
                    self._fail(job, str(outcome), permanent=True)
                else:
                    self._fail(job, f"{type(outcome).__name__}: {outcome}", permanent=False)
                self.held.remove(job)
        finally:
            beat_stop.set()
            self.current, self.held = None, []

    def _heartbeat_all(self, done: threading.Event) -> None:
        interval = max(self._cfg.lease_seconds / 3, 0.05)
        while not done.wait(interval):
            for job in list(self.held):
                try:
                    self.ctx.queue.heartbeat(job, self._cfg.lease_seconds)
                except StorageError as exc:
                    logger.warning("heartbeat of job %d failed: %s", job.id, exc)

    def _fail(self, job: Job, error: str, *, permanent: bool) -> JobState | None:
        cfg = self._cfg
        if permanent or job.attempts >= job.max_attempts:
            state = self.ctx.queue.fail(job, error, retry_in=None)
            logger.error("job %d (%s) dead-lettered after %d attempt(s): %s",
                         job.id, job.kind, job.attempts, error)
            if state is JobState.DEAD:
                from node.audit import audit

                audit(self.ctx.db, self.ctx.settings.data_dir, AuditKind.JOB_DEAD,
                      outcome="failure", actor=self.name, job_id=job.id, job_kind=job.kind,
                      error=error[:500])
            return state
        delay = backoff_delay(job.attempts, cfg.backoff_seconds, cfg.backoff_max_seconds)
        logger.warning("job %d (%s) attempt %d/%d failed, retry in %.1f s: %s",
                       job.id, job.kind, job.attempts, job.max_attempts, delay, error)
        return self.ctx.queue.fail(job, error, retry_in=delay)

    def _heartbeat(self, job: Job, done: threading.Event) -> None:
        interval = max(self._cfg.lease_seconds / 3, 0.05)
        while not done.wait(interval):
            try:
                if not self.ctx.queue.heartbeat(job, self._cfg.lease_seconds):
                    logger.warning("job %d lost its lease", job.id)
                    return
            except StorageError as exc:
                logger.warning("heartbeat of job %d failed: %s", job.id, exc)

    def release_current(self) -> bool:
        """Give the job (or the batch) in hand back to the queue (shutdown past the grace
        period); ``True`` if any was given back."""
        jobs = list(self.held) or ([self.current] if self.current is not None else [])
        released = False
        for job in jobs:
            try:
                released = self.ctx.queue.release(job) or released
            except StorageError:
                pass
        return released
