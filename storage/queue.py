"""The job queue: one interface, a SQL implementation and an in-memory one.

Semantics (the contract suite in ``tests/integration/test_queue_contract.py`` checks them on
SQLite, PostgreSQL and memory):

- ``enqueue`` with a ``dedupe_key`` creates at most one job per key, ever.
- ``lease`` hands a due job to exactly one owner, counts an attempt, and sets a lease that
  expires; an expired lease makes the job leasable again (a worker that died loses it).
- ``complete`` / ``fail`` / ``release`` / ``heartbeat`` act only while the caller still holds the
  lease (its token); a worker whose lease expired cannot overwrite another worker's outcome.
- ``fail`` either re-queues the job after a delay or, with ``retry_in=None``, dead-letters it
  keeping the last error; ``retry`` re-queues dead jobs.

On PostgreSQL a lease uses ``SELECT … FOR UPDATE SKIP LOCKED``; on SQLite the ``BEGIN
IMMEDIATE`` transaction of :class:`storage.db.Database` serialises the select-and-update.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from storage.db import Database, Prepared, PreparedInsert
from storage.models import JobRow, UTCDateTime
from storage.records import Job, JobState

MAX_ERROR_CHARS = 2000


def _now() -> datetime:
    return datetime.now(UTC)


def _token() -> str:
    return secrets.token_hex(16)


class JobQueue(ABC):
    """What the worker and the SCP need from a queue."""

    default_max_attempts: int = 5

    def prepare(self) -> None:
        """Do now what a worker's first lease and completion would pay for (a worker's
        warm-up); nothing for a queue that has nothing to prepare."""
        return None

    @abstractmethod
    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        run_after: datetime | None = None,
        max_attempts: int | None = None,
        session: Session | Connection | None = None,
    ) -> int | None:
        """Add a job; return its id, or ``None`` if *dedupe_key* already has a job.

        With *session* (an ORM session or a Core connection), the job joins that transaction
        (SQL queue only).
        """

    @abstractmethod
    def lease(self, owner: str, kinds: Sequence[str], lease_seconds: float) -> Job | None:
        """Lease the next due job of one of *kinds*, or return ``None``."""

    def lease_many(
        self, owner: str, kinds: Sequence[str], lease_seconds: float, limit: int,
        *, at_least: int = 1,
    ) -> list[Job]:
        """Lease up to *limit* due jobs of *kinds* at once, in queue order.

        Each is leased as by :meth:`lease` (its own token and attempt count). The SQL queue
        does it in one transaction, so a worker taking a batch takes the write lock once,
        and with *at_least* leases nothing unless that many are due (looked at without the
        lock); the in-memory queue leases what is due.
        """
        jobs: list[Job] = []
        for _ in range(limit):
            job = self.lease(owner, kinds, lease_seconds)
            if job is None:
                break
            jobs.append(job)
        return jobs

    @abstractmethod
    def heartbeat(self, job: Job, lease_seconds: float) -> bool:
        """Extend the lease; ``False`` if the lease was lost."""

    @abstractmethod
    def complete(self, job: Job) -> bool:
        """Mark the job done; ``False`` if the lease was lost."""

    def complete_many(
        self, jobs: Sequence[Job], *, session: Session | Connection | None = None
    ) -> list[bool]:
        """:meth:`complete` each of *jobs* (the SQL queue: in one transaction, or in the
        caller's with *session*, so that a handler's writes and its jobs' completion commit
        together)."""
        if session is not None:
            raise NotImplementedError("only the SQL queue completes jobs in a transaction")
        return [self.complete(job) for job in jobs]

    @abstractmethod
    def fail(self, job: Job, error: str, *, retry_in: float | None) -> JobState | None:
        """Record *error*; re-queue after *retry_in* seconds or dead-letter (``None``).

        Returns the new state, or ``None`` if the lease was lost.
        """

    @abstractmethod
    def release(self, job: Job) -> bool:
        """Give the job back without counting the attempt (graceful shutdown)."""

    @abstractmethod
    def retry(self, ids: Iterable[int] | None = None) -> int:
        """Re-queue dead jobs (all, or those in *ids*) with a fresh attempt budget."""

    @abstractmethod
    def purge(self, state: JobState, *, older_than: timedelta | None = None) -> int:
        """Delete jobs in *state* (``done`` or ``dead``) last updated before *older_than* ago."""

    @abstractmethod
    def list(
        self, *, state: JobState | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first."""

    @abstractmethod
    def counts(self) -> dict[tuple[str, JobState], int]:
        """Number of jobs per (kind, state)."""


# --------------------------------------------------------------------------------------------
# SQL


def _to_job(row: Any) -> Job:
    """A :class:`Job` from an ORM row or a Core row of the jobs table."""
    return Job(
        id=row.id,
        kind=row.kind,
        state=JobState(row.state),
        payload=dict(row.payload or {}),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        run_after=row.run_after,
        created_at=row.created_at,
        lease_token=row.lease_token,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        last_error=row.last_error,
        dedupe_key=row.dedupe_key,
        updated_at=row.updated_at,
    )


_JOB_COLUMNS = ("kind", "state", "payload", "dedupe_key", "attempts", "max_attempts",
                "run_after", "created_at", "updated_at")


class SqlQueue(JobQueue):
    """The queue in the node's database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database, *, default_max_attempts: int = 5) -> None:
        self.db = db
        self.default_max_attempts = default_max_attempts
        # Compiled once (it is on the C-STORE path); a NULL dedupe key never conflicts.
        self._insert = PreparedInsert(db, JobRow.__table__, _JOB_COLUMNS, "dedupe_key")

    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        run_after: datetime | None = None,
        max_attempts: int | None = None,
        session: Session | Connection | None = None,
    ) -> int | None:
        now = _now()
        values = {
            "kind": kind,
            "state": JobState.QUEUED.value,
            "payload": payload,
            "dedupe_key": dedupe_key,
            "attempts": 0,
            "max_attempts": max_attempts or self.default_max_attempts,
            "run_after": run_after or now,
            "created_at": now,
            "updated_at": now,
        }
        if session is not None:
            return self._insert(session, values)
        with self.db.transaction() as conn:
            return self._insert(conn, values)

    def lease(self, owner: str, kinds: Sequence[str], lease_seconds: float) -> Job | None:
        jobs = self.lease_many(owner, kinds, lease_seconds, 1)
        return jobs[0] if jobs else None

    def _due(self, kinds: Sequence[str], now: Any) -> Any:
        # One comparison per kind rather than IN: a prepared statement takes no IN list.
        return and_(
            or_(*(JobRow.kind == kind for kind in kinds)),
            or_(
                and_(JobRow.state == JobState.QUEUED.value, JobRow.run_after <= now),
                and_(JobRow.state == JobState.LEASED.value, JobRow.lease_expires_at < now),
            ),
        )

    def lease_many(
        self, owner: str, kinds: Sequence[str], lease_seconds: float, limit: int,
        *, at_least: int = 1,
    ) -> list[Job]:
        if not kinds or limit < 1:
            return []
        now = _now()
        kinds = tuple(sorted(set(kinds)))
        if not self.db.is_postgresql or at_least > 1:
            # An idle poll must not take SQLite's write turn: look first, without a lock
            # (a deferred read in WAL mode), and only then lease in a write transaction.
            wanted = max(1, min(at_least, limit))
            with self.db.read() as conn:
                found = conn.execute(
                    select(func.count()).select_from(
                        select(JobRow.id).where(self._due(kinds, now)).limit(wanted).subquery())
                ).scalar_one()
            if found < wanted:
                return []
        # Prepared statements (storage.db.Prepared): on SQLite the write turn is held for the
        # SQL, not for SQLAlchemy building it; the leased rows are read after the commit.
        candidates = self.db.prepared(("queue", "due", kinds, limit), partial(
            self._due_query, kinds, limit))
        take = self._take()
        token = _token()  # one for the batch: a token names one lease of one owner
        with self.db.transaction() as conn:
            ids: list[int] = []
            dead: list[int] = []
            for job_id, state, attempts, max_attempts in candidates.run(conn, {"j_now": now})[1]:
                if state == JobState.LEASED.value and attempts >= max_attempts:
                    # Its worker died holding the last attempt: dead-letter, do not run again.
                    dead.append(job_id)
                    if limit == 1:
                        break
                else:
                    ids.append(job_id)
            if dead:
                conn.execute(
                    update(JobRow)
                    .where(JobRow.id.in_(dead))
                    .values(
                        state=JobState.DEAD.value,
                        last_error=func.coalesce(JobRow.last_error, "")
                        + " [lease expired on the last attempt]",
                        lease_token=None,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )
            lease = {"j_owner": owner[:64], "j_token": token,
                     "j_expires": now + timedelta(seconds=lease_seconds), "j_now": now}
            for job_id in ids:
                take.run(conn, {"j_id": job_id, **lease})
        if not ids:
            return []
        # Ours until the lease expires: read without the write turn.
        with self.db.read() as conn:
            rows = conn.execute(
                select(JobRow.__table__).where(JobRow.id.in_(ids), JobRow.lease_token == token)
            ).all()
        by_id = {row.id: row for row in rows}
        return [_to_job(by_id[i]) for i in ids if i in by_id]

    def prepare(self) -> None:
        """Compile the statements a worker's lease and completion run (compiled by the
        first batch instead, inside SQLite's write turn)."""
        self._take()
        self._complete()

    def _take(self) -> Prepared:
        return self.db.prepared(("queue", "take"), lambda: update(JobRow).where(
            JobRow.id == bindparam("j_id")
        ).values(
            state=JobState.LEASED.value,
            attempts=JobRow.attempts + 1,
            lease_owner=bindparam("j_owner"),
            lease_token=bindparam("j_token"),
            lease_expires_at=bindparam("j_expires"),
            updated_at=bindparam("j_now"),
        ))

    def _complete(self) -> Prepared:
        return self.db.prepared(("queue", "complete"), lambda: update(JobRow).where(
            JobRow.id == bindparam("j_id"),
            JobRow.state == JobState.LEASED.value,
            JobRow.lease_token == bindparam("j_token"),
        ).values(
            state=JobState.DONE.value,
            lease_token=None,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=bindparam("j_now"),
        ))

    def _due_query(self, kinds: Sequence[str], limit: int) -> Any:
        query = (
            select(JobRow.id, JobRow.state, JobRow.attempts, JobRow.max_attempts)
            .where(self._due(kinds, bindparam("j_now", type_=UTCDateTime())))
            .order_by(JobRow.run_after, JobRow.id)
            .limit(limit)
        )
        if self.db.is_postgresql:
            query = query.with_for_update(skip_locked=True)
        return query

    def _owned(self, job: Job) -> Any:
        return and_(
            JobRow.id == job.id,
            JobRow.state == JobState.LEASED.value,
            JobRow.lease_token == job.lease_token,
        )

    def _update(self, job: Job, **values: Any) -> bool:
        values.setdefault("updated_at", _now())
        with self.db.session() as s:
            result = s.execute(update(JobRow).where(self._owned(job)).values(**values))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def heartbeat(self, job: Job, lease_seconds: float) -> bool:
        return self._update(job, lease_expires_at=_now() + timedelta(seconds=lease_seconds))

    def complete_many(
        self, jobs: Sequence[Job], *, session: Session | Connection | None = None
    ) -> list[bool]:
        if not jobs:
            return []
        if session is None:
            with self.db.transaction() as conn:
                return self.complete_many(jobs, session=conn)
        # One prepared statement per job (no IN list: it would be built per call), each
        # telling whether that job was still leased under its token.
        complete = self._complete()
        now = _now()
        return [
            bool(job.lease_token)
            and complete.run(session, {"j_id": job.id, "j_token": job.lease_token,
                                       "j_now": now})[0] == 1
            for job in jobs
        ]

    def complete(self, job: Job) -> bool:
        return self._update(
            job,
            state=JobState.DONE.value,
            lease_token=None,
            lease_owner=None,
            lease_expires_at=None,
        )

    def fail(self, job: Job, error: str, *, retry_in: float | None) -> JobState | None:
        state = JobState.DEAD if retry_in is None else JobState.QUEUED
        values: dict[str, Any] = {
            "state": state.value,
            "last_error": error[:MAX_ERROR_CHARS],
            "lease_token": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if retry_in is not None:
            values["run_after"] = _now() + timedelta(seconds=retry_in)
        return state if self._update(job, **values) else None

    def release(self, job: Job) -> bool:
        return self._update(
            job,
            state=JobState.QUEUED.value,
            attempts=JobRow.attempts - 1,
            lease_token=None,
            lease_owner=None,
            lease_expires_at=None,
        )

    def retry(self, ids: Iterable[int] | None = None) -> int:
        stmt = update(JobRow).where(JobRow.state == JobState.DEAD.value)
        if ids is not None:
            stmt = stmt.where(JobRow.id.in_(list(ids)))
        stmt = stmt.values(
            state=JobState.QUEUED.value, attempts=0, run_after=_now(), updated_at=_now()
        )
        with self.db.session() as s:
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]

    def purge(self, state: JobState, *, older_than: timedelta | None = None) -> int:
        if state not in (JobState.DONE, JobState.DEAD):
            raise ValueError("only done or dead jobs can be purged")
        stmt = delete(JobRow).where(JobRow.state == state.value)
        if older_than is not None:
            stmt = stmt.where(JobRow.updated_at < _now() - older_than)
        with self.db.session() as s:
            return int(s.execute(stmt).rowcount)  # type: ignore[attr-defined]

    def list(
        self, *, state: JobState | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Job]:
        query = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        if kind is not None:
            query = query.where(JobRow.kind == kind)
        with self.db.session() as s:
            return [_to_job(r) for r in s.execute(query).scalars()]

    def counts(self) -> dict[tuple[str, JobState], int]:
        query = select(JobRow.kind, JobRow.state, func.count()).group_by(JobRow.kind, JobRow.state)
        with self.db.session() as s:
            return {(k, JobState(st)): int(n) for k, st, n in s.execute(query)}


# --------------------------------------------------------------------------------------------
# Memory


class MemoryQueue(JobQueue):
    """A thread-safe in-memory queue with the same contract (tests and offline tools)."""

    def __init__(self, *, default_max_attempts: int = 5) -> None:
        self.default_max_attempts = default_max_attempts
        self._jobs: dict[int, Job] = {}
        self._keys: set[str] = set()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def enqueue(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        run_after: datetime | None = None,
        max_attempts: int | None = None,
        session: Session | Connection | None = None,
    ) -> int | None:
        now = _now()
        with self._lock:
            if dedupe_key is not None:
                if dedupe_key in self._keys:
                    return None
                self._keys.add(dedupe_key)
            job_id = next(self._ids)
            self._jobs[job_id] = Job(
                id=job_id,
                kind=kind,
                state=JobState.QUEUED,
                payload=dict(payload),
                attempts=0,
                max_attempts=max_attempts or self.default_max_attempts,
                run_after=run_after or now,
                created_at=now,
                dedupe_key=dedupe_key,
                updated_at=now,
            )
            return job_id

    def lease(self, owner: str, kinds: Sequence[str], lease_seconds: float) -> Job | None:
        now = _now()
        with self._lock:
            due = [
                j
                for j in self._jobs.values()
                if j.kind in kinds
                and (
                    (j.state is JobState.QUEUED and j.run_after <= now)
                    or (
                        j.state is JobState.LEASED
                        and j.lease_expires_at is not None
                        and j.lease_expires_at < now
                    )
                )
            ]
            if not due:
                return None
            job = min(due, key=lambda j: (j.run_after, j.id))
            if job.state is JobState.LEASED and job.attempts >= job.max_attempts:
                self._jobs[job.id] = replace(
                    job,
                    state=JobState.DEAD,
                    last_error=(job.last_error or "") + " [lease expired on the last attempt]",
                    lease_token=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
                return None
            leased = replace(
                job,
                state=JobState.LEASED,
                attempts=job.attempts + 1,
                lease_owner=owner,
                lease_token=_token(),
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                updated_at=now,
            )
            self._jobs[job.id] = leased
            return leased

    def _swap(self, job: Job, **changes: Any) -> bool:
        with self._lock:
            current = self._jobs.get(job.id)
            if (
                current is None
                or current.state is not JobState.LEASED
                or current.lease_token != job.lease_token
            ):
                return False
            self._jobs[job.id] = replace(current, updated_at=_now(), **changes)
            return True

    def heartbeat(self, job: Job, lease_seconds: float) -> bool:
        return self._swap(job, lease_expires_at=_now() + timedelta(seconds=lease_seconds))

    def complete(self, job: Job) -> bool:
        return self._swap(
            job, state=JobState.DONE, lease_token=None, lease_owner=None, lease_expires_at=None
        )

    def fail(self, job: Job, error: str, *, retry_in: float | None) -> JobState | None:
        state = JobState.DEAD if retry_in is None else JobState.QUEUED
        changes: dict[str, Any] = {
            "state": state,
            "last_error": error[:MAX_ERROR_CHARS],
            "lease_token": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if retry_in is not None:
            changes["run_after"] = _now() + timedelta(seconds=retry_in)
        return state if self._swap(job, **changes) else None

    def release(self, job: Job) -> bool:
        with self._lock:
            current = self._jobs.get(job.id)
            attempts = current.attempts - 1 if current else 0
        return self._swap(
            job,
            state=JobState.QUEUED,
            attempts=attempts,
            lease_token=None,
            lease_owner=None,
            lease_expires_at=None,
        )

    def retry(self, ids: Iterable[int] | None = None) -> int:
        wanted = set(ids) if ids is not None else None
        n = 0
        with self._lock:
            for job_id, job in list(self._jobs.items()):
                if job.state is JobState.DEAD and (wanted is None or job_id in wanted):
                    self._jobs[job_id] = replace(
                        job, state=JobState.QUEUED, attempts=0, run_after=_now(), updated_at=_now()
                    )
                    n += 1
        return n

    def purge(self, state: JobState, *, older_than: timedelta | None = None) -> int:
        if state not in (JobState.DONE, JobState.DEAD):
            raise ValueError("only done or dead jobs can be purged")
        cutoff = _now() - older_than if older_than is not None else None
        with self._lock:
            doomed = [
                j.id
                for j in self._jobs.values()
                if j.state is state
                and (cutoff is None or (j.updated_at is not None and j.updated_at < cutoff))
            ]
            for job_id in doomed:
                del self._jobs[job_id]
        return len(doomed)

    def list(
        self, *, state: JobState | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Job]:
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: j.id, reverse=True)
        return [
            j
            for j in jobs
            if (state is None or j.state is state) and (kind is None or j.kind == kind)
        ][:limit]

    def counts(self) -> dict[tuple[str, JobState], int]:
        out: dict[tuple[str, JobState], int] = {}
        with self._lock:
            for j in self._jobs.values():
                out[(j.kind, j.state)] = out.get((j.kind, j.state), 0) + 1
        return out
