"""The ``deidentify`` job: from the encrypted spool to a de-identified instance (PS3.15 Annex E).

For one received instance (:class:`~node.jobs.DeidentifyPayload`) the handler

1. loads the ``instances`` row and decrypts the spool item (the dataset as received, in the
   negotiated transfer syntax, deflate included);
2. de-identifies it with the node's profile and keys (:class:`node.deid.engine.Deidentifier`);
   an instance the burned-in gate does not admit ends ``rejected`` with its reason and an
   audit record, and its job completes;
3. checks the residue: no value of an identifying attribute of the input may appear in the
   output header, else the job is dead-lettered naming the attributes (never their values);
4. stores the output in the blob store (:mod:`storage.blobs`);
5. in one transaction: upserts the study (``receiving``, ``last_received_at``, a ``complete``
   study is re-opened with its version incremented), the series (modality, body part, view
   position from the de-identified header) and ``deid_instances``; writes the vault records;
   marks the instance ``deidentified`` with its blob reference; appends the audit record;
6. deletes the spool item, only after the commit.

Every step is idempotent: a job that runs again after a crash stores the blob again (the
record a crash left without a row is removed by :func:`sweep_orphan_blobs`), upserts the same
rows, or finds the instance ``deidentified`` and only removes a spool item that a crash left
behind. Rejected instances keep their encrypted spool item for
``[spool] reject_retention_hours``; :func:`sweep_rejected` (a periodic worker sweep) removes
it after that.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Row

from node.config import Settings
from node.deid import vault
from node.deid.engine import Deidentifier, DeidResult
from node.errors import MalformedDataset, RejectedInstance
from node.jobs import (
    COMPLETED,
    DeidentifyPayload,
    JobContext,
    JobKind,
    Outcome,
    PermanentJobError,
    periodic,
    register,
    register_batch,
    register_warm_up,
)
from node.keys import NodeKeys
from node.logs import short_key
from storage.audit import AuditKind, record
from storage.errors import StorageError
from storage.models import AuditEvent, DeidInstance, Instance, Series, Study
from storage.queue import SqlQueue
from storage.records import InstanceState, Job, StudyState
from storage.spool import record_length
from storage.turn import is_idle, run_idle

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 600.0
"""How often the workers look for rejected instances whose retention has passed, and for
orphan spool items."""
# A spool item or blob no row names is an orphan once this old (see remove_orphan_spool).
ORPHAN_AGE_SECONDS = 3600.0
BLOB_SWEEP_SECONDS = 3600.0
"""How often the workers look for orphan blobs (:func:`remove_orphan_blobs`)."""
BLOB_SWEEP_WINDOW_SECONDS = 3 * 24 * 3600.0
"""The blob sweep reads the packs written to in this window only: an orphan blob is written
(by a worker killed before its commit) into the pack the worker was appending to."""
_IN_CHUNK = 500
BATCH_JOBS = 32
"""Most ``deidentify`` jobs a worker leases and records in one go (see deidentify_batch).
During a burst a worker leases only full batches; the last ones leased before the burst ends
are what is left to de-identify after it. With 64 the end-to-end time of 200 CT instances was
longer in each of 7 paired runs (median 0.90 s against 0.79 s with 32) for the same receive
rate: the two workers share the end of a burst more evenly."""
READ_AHEAD = 4
"""Spool records a batch reads ahead of the instance it de-identifies (see _BatchIO)."""
BATCH_IO_BYTES = 64 << 20
"""Bytes of spool records a batch reads ahead, and bytes of outputs it has waiting to be
written, at most each (at least one record either way): a batch of large instances (a
multi-frame series of hundreds of MB each) holds a few at a time, not :data:`BATCH_JOBS`. An
output's bytes are let go once written; its transaction needs only its size."""
OVERLAP_BYTES = 128 << 10
"""Records and outputs at least this large are read and written beside the engine
(_BatchIO); a smaller one costs more to hand to a thread than to read or write in place."""
T = TypeVar("T")

_engines: dict[int, tuple[Settings, bytes, Deidentifier]] = {}
_lock = threading.Lock()


def engine_for(settings: Settings, keys: NodeKeys) -> Deidentifier:
    """The process's engine for *settings* and *keys* (built once, it caches decisions)."""
    with _lock:
        cached = _engines.get(id(settings))
        if cached is not None and cached[0] is settings and cached[1] == keys.site:
            return cached[2]
        engine = Deidentifier(settings.deid, keys.site)
        if len(_engines) >= 8:  # settings are built once per process; stay bounded anyway
            _engines.clear()
        _engines[id(settings)] = (settings, keys.site, engine)
        return engine


def _set_state(ctx: JobContext, instance_id: int, state: InstanceState, **values: Any) -> None:
    with ctx.db.session() as s:
        s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(state=state.value, updated_at=datetime.now(UTC), **values)
        )


@register(JobKind.DEIDENTIFY)
def deidentify_job(job: Job, payload: DeidentifyPayload, ctx: JobContext) -> None:
    """Handle one ``deidentify`` job (see the module documentation)."""
    rows = _load_rows(ctx, [payload.instance_id])
    item = _guarded(job, ctx, payload.instance_id,
                    partial(_prepare, ctx, payload.instance_id, rows.get(payload.instance_id)))
    if item is not None:
        try:
            _guarded(job, ctx, item.instance_id, partial(_commit, ctx, [item]))
        except Exception as exc:
            _discard_blobs(ctx, [item], exc)
            raise
        _finish(ctx, [item])


@register_batch(JobKind.DEIDENTIFY, max_jobs=BATCH_JOBS)
def deidentify_batch(
    jobs: list[tuple[Job, DeidentifyPayload]], ctx: JobContext
) -> list[Outcome]:
    """Handle up to :data:`BATCH_JOBS` ``deidentify`` jobs: each instance is de-identified
    as by :func:`deidentify_job`, the batch's blobs are stored and made durable together
    (:meth:`storage.blobs.BlobStore.put_many`: one sync), then every instance of the batch is
    recorded in **one** transaction (one turn of SQLite's write lock and one commit for the
    batch, instead of one per instance, while the SCP's commits wait for the same lock).

    If that transaction fails for any reason but the database being unavailable, each
    instance is recorded in a transaction of its own, so that one bad row fails only its
    own job. Outcomes are per job, as :class:`node.jobs.BatchFunction` says.
    """
    outcomes: list[Outcome] = [None] * len(jobs)
    ready: list[tuple[int, Job, _Prepared]] = []
    try:  # one read of the batch's rows, not one per instance
        rows = _load_rows(ctx, [payload.instance_id for _, payload in jobs])
    except StorageError as exc:
        return [exc] * len(jobs)
    io = _BatchIO.of_process()
    batch = [(job, payload.instance_id, rows.get(payload.instance_id)) for job, payload in jobs]
    reads = _ReadAhead(io, ctx, [row for _, _, row in batch])
    writes = _WriteBehind(io, ctx)
    for i, (job, instance_id, row) in enumerate(batch):
        reads.advance(i)
        try:
            item = _guarded(job, ctx, instance_id,
                            partial(_prepare, ctx, instance_id, row, store_blob=False,
                                    fetched=reads.take(i)))
        except Exception as exc:
            outcomes[i] = exc
            continue
        if item is not None:
            writes.write(item.result.data)
            ready.append((i, job, item.written()))
    if not ready:
        return outcomes
    try:  # the batch's blobs are synced together, not one sync per instance
        refs = [write.result() for write in writes.futures]
        ctx.blobs.sync()
    except StorageError as exc:
        for i, job, item in ready:
            outcomes[i] = exc
            _mark_failed_if_last(job, ctx, item.instance_id)
        return outcomes
    ready = [(i, job, dataclasses.replace(item, blob_ref=ref))
             for (i, job, item), ref in zip(ready, refs, strict=True)]
    try:  # the jobs are completed in the transaction that records them
        completed = _commit(ctx, [item for _, _, item in ready], [job for _, job, _ in ready])
        committed = ready
        for (i, _, _), ok in zip(ready, completed, strict=True):
            outcomes[i] = COMPLETED if ok else None
    except StorageError as exc:  # the database is unavailable: every job retries
        for i, job, item in ready:
            outcomes[i] = exc
            _mark_failed_if_last(job, ctx, item.instance_id)
        return outcomes  # their blobs stay: the commit may have landed
    except Exception:
        committed = []
        for i, job, item in ready:
            try:
                _guarded(job, ctx, item.instance_id, partial(_commit, ctx, [item]))
            except Exception as exc:
                outcomes[i] = exc
                _discard_blobs(ctx, [item], exc)
            else:
                committed.append((i, job, item))
    try:
        _finish(ctx, [item for _, _, item in committed])
    except Exception as exc:  # a retry finds the instance recorded and removes the item
        for i, _, _ in committed:
            outcomes[i] = exc
    return outcomes


def _guarded(job: Job, ctx: JobContext, instance_id: int, step: Callable[[], T]) -> T:
    """Run *step* of *job*; an error that ends the job marks the instance ``failed``."""
    try:
        return step()
    except PermanentJobError:
        _set_state(ctx, instance_id, InstanceState.FAILED)
        raise
    except Exception:
        _mark_failed_if_last(job, ctx, instance_id)
        raise


def _mark_failed_if_last(job: Job, ctx: JobContext, instance_id: int) -> None:
    if job.attempts >= job.max_attempts:  # the worker dead-letters it after this attempt
        try:
            _set_state(ctx, instance_id, InstanceState.FAILED)
        except Exception as exc:  # keep the original error for the job
            logger.warning("cannot mark instance %d failed: %s", instance_id, exc)


@dataclass(frozen=True)
class _Prepared:
    """A de-identified instance whose blob is stored, waiting for its transaction."""

    instance_id: int
    study_key: str
    series_key: str
    spool_name: str
    result: DeidResult
    blob_ref: str
    size: int
    """Bytes of the output (``result.data``, which :meth:`written` lets go)."""

    def written(self) -> _Prepared:
        """This item without its output bytes (handed to the blob store)."""
        return dataclasses.replace(self, result=dataclasses.replace(self.result, data=b""))


_InstanceRow = Row[int, str, str | None, str, str, str, str]


def _load_rows(ctx: JobContext, instance_ids: list[int]) -> dict[int, _InstanceRow]:
    """The ``instances`` rows step 1 needs, by id, in one read per :data:`_IN_CHUNK` ids."""
    rows: dict[int, _InstanceRow] = {}
    with ctx.db.read() as conn:
        for start in range(0, len(instance_ids), _IN_CHUNK):
            chunk = instance_ids[start : start + _IN_CHUNK]
            for row in conn.execute(
                select(
                    Instance.id, Instance.state, Instance.spool_name,
                    Instance.transfer_syntax_uid, Instance.sop_key, Instance.study_key,
                    Instance.series_key,
                ).where(Instance.id.in_(chunk))
            ):
                rows[row.id] = row
    return rows


def _prepare(
    ctx: JobContext, instance_id: int, row: _InstanceRow | None, *, store_blob: bool = True,
    fetched: Future[bytes | None] | None = None,
) -> _Prepared | None:
    """Steps 1-4 for the instance whose ``instances`` row is *row* (:func:`_load_rows`; no
    write transaction); ``None`` when nothing is left to record. Without *store_blob* the
    caller stores the blob (``blob_ref`` is empty until then); *fetched* is the spool
    record read ahead (:meth:`_BatchIO.read`), read here without it."""
    if row is None:
        raise PermanentJobError(f"instance {instance_id} does not exist")
    _, state, spool_name, syntax, sop_key, study_key, series_key = row

    if state == InstanceState.DEIDENTIFIED.value:
        if spool_name and ctx.spool.exists(spool_name):
            ctx.spool.delete(spool_name)
        logger.info("instance %d was de-identified already", instance_id)
        return None
    if state == InstanceState.REJECTED.value:
        logger.info("instance %d was rejected already", instance_id)
        return None
    raw = fetched.result() if fetched is not None else _fetch(ctx, spool_name)
    if raw is None or not spool_name:
        raise PermanentJobError(f"the spool item of instance {instance_id} is missing")
    engine = engine_for(ctx.settings, ctx.keys)
    try:
        result = engine.deidentify(raw, syntax)
    except RejectedInstance as exc:
        _reject(ctx, instance_id, sop_key, study_key, str(exc))
        return None
    except MalformedDataset as exc:
        raise PermanentJobError(f"instance {instance_id} cannot be de-identified: {exc}") from exc
    del raw
    if result.residue:
        raise PermanentJobError(
            f"residue check failed for instance {instance_id}: a value of "
            f"{', '.join(result.residue)} remains in the de-identified output"
        )
    if result.sop_key != sop_key or result.study_key != study_key:
        raise PermanentJobError(
            f"instance {instance_id}: the dataset's UIDs differ from those it was received under"
        )
    ref = ctx.blobs.put(result.data) if store_blob else ""
    item = _Prepared(instance_id, study_key, series_key, spool_name, result, ref,
                     len(result.data))
    return item.written() if store_blob else item


def _fetch(ctx: JobContext, spool_name: str | None) -> bytes | None:
    """The decrypted spool record *spool_name*, or ``None`` if it is missing."""
    return ctx.spool.get_live(spool_name) if spool_name else None


class _BatchIO:
    """A worker process's two I/O threads for its batches: one reads the spool records
    ahead of the instance being de-identified (:data:`READ_AHEAD`), one appends each output
    to the blob pack as soon as it is made, so that the disk works while the engine does
    (reads and writes are ``O_DIRECT`` and give the GIL up while they wait). Measured
    draining a CT burst in service, a worker had spent about half of each batch waiting on
    one or the other, one after the other.

    Each task runs at the CPU policy of the thread that submitted it: a scheduling policy is
    a thread's own, so the worker's ``SCHED_IDLE`` while the SCP is receiving
    (:meth:`node.worker.Worker._pace`) would otherwise leave these threads, and the
    decryption and encryption they do, at ``workers.nice`` beside the receiver."""

    _process: tuple[int, _BatchIO] | None = None

    def __init__(self) -> None:
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="deid-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="deid-write")

    @classmethod
    def of_process(cls) -> _BatchIO:
        """This process's threads (a forked child starts its own)."""
        current = cls._process
        if current is None or current[0] != os.getpid():
            current = cls._process = (os.getpid(), cls())
        return current[1]

    def start(self) -> None:
        """Start both threads now (a worker's warm-up: they take its CPU priority then)."""
        self._reader.submit(int).result()
        self._writer.submit(int).result()

    def read(self, ctx: JobContext, row: _InstanceRow | None) -> Future[bytes | None] | None:
        """Start reading the spool record of *row* if it is one to de-identify."""
        if row is None or row[1] in (InstanceState.DEIDENTIFIED.value,
                                     InstanceState.REJECTED.value):
            return None
        try:
            if not row[2] or record_length(row[2]) < OVERLAP_BYTES:
                return None  # read in place (_prepare)
        except StorageError:
            return None  # an invalid locator: _prepare reports it for its job
        return self._reader.submit(_as_caller, is_idle(), _fetch, ctx, row[2])

    def write(self, ctx: JobContext, data: bytes) -> Future[str]:
        """Start appending *data* to the blob store (not synced)."""
        if len(data) >= OVERLAP_BYTES:
            return self._writer.submit(_as_caller, is_idle(), ctx.blobs.append, data)
        done: Future[str] = Future()
        try:
            done.set_result(ctx.blobs.append(data))
        except Exception as exc:
            done.set_exception(exc)
        return done


class _ReadAhead:
    """The spool reads of one batch: up to :data:`READ_AHEAD` records ahead of the one in
    hand, within :data:`BATCH_IO_BYTES` (a record that does not fit is read when its turn
    comes, in place, unless nothing else is ahead)."""

    def __init__(self, io: _BatchIO, ctx: JobContext, rows: list[_InstanceRow | None]) -> None:
        self._io, self._ctx, self._rows = io, ctx, rows
        self._reads: dict[int, tuple[Future[bytes | None], int]] = {}
        self._next = 0  # the next record to consider
        self._ahead = 0  # bytes of the reads in self._reads

    def advance(self, current: int) -> None:
        """Start the reads the budget allows before record *current* is de-identified."""
        self._next = max(self._next, current)
        while self._next < len(self._rows) and self._next <= current + READ_AHEAD:
            row = self._rows[self._next]
            size = _record_size(row)
            if self._reads and self._ahead + size > BATCH_IO_BYTES:
                return  # wait for the records ahead to be taken
            read = self._io.read(self._ctx, row)
            if read is not None:
                self._reads[self._next] = (read, size)
                self._ahead += size
            self._next += 1

    def take(self, index: int) -> Future[bytes | None] | None:
        """The read of record *index* (``None``: read it in place); not kept here after."""
        read, size = self._reads.pop(index, (None, 0))
        self._ahead -= size
        return read


class _WriteBehind:
    """The blob writes of one batch (:meth:`_BatchIO.write`), at most
    :data:`BATCH_IO_BYTES` of them waiting at a time (at least one)."""

    def __init__(self, io: _BatchIO, ctx: JobContext) -> None:
        self._io, self._ctx = io, ctx
        self.futures: list[Future[str]] = []
        """Every write of the batch, in order."""
        self._pending: deque[tuple[Future[str], int]] = deque()
        self._bytes = 0  # of the writes in self._pending

    def write(self, data: bytes) -> None:
        """Start writing *data* once the writes before it leave room for it."""
        while self._pending and (
            self._pending[0][0].done() or self._bytes + len(data) > BATCH_IO_BYTES
        ):
            oldest, size = self._pending.popleft()
            wait([oldest])  # its error, if any, is the batch's when it collects the refs
            self._bytes -= size
        future = self._io.write(self._ctx, data)
        self.futures.append(future)
        self._pending.append((future, len(data)))
        self._bytes += len(data)


def _record_size(row: _InstanceRow | None) -> int:
    try:
        return record_length(row[2]) if row is not None and row[2] else 0
    except StorageError:
        return 0


def _as_caller(idle: bool, fn: Callable[..., T], *args: Any) -> T:
    """Run *fn* in an I/O thread of :class:`_BatchIO` under the submitter's policy."""
    run_idle(idle)
    return fn(*args)


def _commit(
    ctx: JobContext, items: list[_Prepared], jobs: list[Job] | None = None
) -> list[bool]:
    """Step 5 for every item, in one transaction; with *jobs* (a batch's, from the SQL
    queue), the jobs are completed in it too (returns which ones were still leased)."""
    with ctx.db.transaction() as conn:
        _record_batch(conn, ctx, items)
        if jobs and isinstance(ctx.queue, SqlQueue):
            return ctx.queue.complete_many(jobs, session=conn)
    return [False] * len(jobs or ())


def _record_batch(conn: Connection, ctx: JobContext, items: list[_Prepared]) -> None:
    """Record *items* as :func:`_record` would one by one, in a few statements prepared once
    per process (:class:`storage.db.Prepared`), most of them one ``executemany``: on SQLite
    the write lock is held for the SQL, not for SQLAlchemy building and processing statements
    (measured: 13.7 ms per batch of 29 CT instances before, of which 4.7 ms of SQL and
    commit; every millisecond held here is one the SCP's commit may wait)."""
    db = ctx.db
    now = datetime.now(UTC)
    firsts: dict[str, _Prepared] = {}
    series_firsts: dict[str, _Prepared] = {}
    for item in items:
        firsts.setdefault(item.study_key, item)
        series_firsts.setdefault(item.series_key, item)

    db.upsert_many(
        conn,
        Study,
        [
            {
                "study_key": key,
                "patient_key": item.result.patient_key,
                "accession_key": item.result.accession_key,
                "state": StudyState.RECEIVING.value,
                "version": 1,
                "first_received_at": now,
                "last_received_at": now,
            }
            for key, item in firsts.items()
        ],
        key="study_key",
    )
    study_of = db.prepared(("deid", "study"), partial(_select_study, db.is_postgresql))
    touch = db.prepared(("deid", "touch-study"), lambda: update(Study).where(
        Study.study_key == bindparam("key")).values(last_received_at=bindparam("now")))
    for key in firsts:
        _, found = study_of.run(conn, {"key": key})
        for state, version, patient_key, accession_key in found:
            values: dict[str, Any] = {}
            if state == StudyState.COMPLETE.value:
                values.update(state=StudyState.RECEIVING.value, version=version + 1,
                              completed_at=None)
                logger.info("study %s re-opened at version %d", short_key(key), version + 1,
                            extra={"study_key": key, "study_version": version + 1})
            if patient_key is None:
                values["patient_key"] = firsts[key].result.patient_key
            if accession_key is None:
                accession = next((i.result.accession_key for i in items
                                  if i.study_key == key and i.result.accession_key), None)
                if accession is not None:
                    values["accession_key"] = accession
            if values:  # rare: built for the occasion
                conn.execute(update(Study).where(Study.study_key == key)
                             .values(last_received_at=now, **values))
            else:
                touch.run(conn, {"key": key, "now": now})

    def _facts(result: DeidResult) -> dict[str, str | None]:
        return {
            "modality": (result.modality or "")[:16] or None,
            "body_part": (result.body_part or "")[:64] or None,
            "view_position": (result.view_position or "")[:16] or None,
        }

    db.upsert_many(
        conn,
        Series,
        [{"series_key": key, "study_key": item.study_key, **_facts(item.result)}
         for key, item in series_firsts.items()],
        key="series_key",
    )
    series_of = db.prepared(("deid", "series"), lambda: select(
        Series.modality, Series.body_part, Series.view_position
    ).where(Series.series_key == bindparam("key")))
    for key, first in series_firsts.items():
        facts = _facts(first.result)
        for current in series_of.run(conn, {"key": key})[1]:
            missing = {name: facts[name] for name, value in
                       zip(("modality", "body_part", "view_position"), current, strict=True)
                       if not value and facts[name]}
            if missing:
                conn.execute(update(Series).where(Series.series_key == key).values(**missing))

    db.upsert_many(
        conn,
        DeidInstance,
        [
            {
                "sop_key": item.result.sop_key,
                "study_key": item.study_key,
                "series_key": item.series_key,
                "sop_class_uid": item.result.sop_class_uid,
                "blob_ref": item.blob_ref,
                "size_bytes": item.size,
                "created_at": now,
            }
            for item in items
        ],
        key="sop_key",
        update_from_row=("blob_ref", "size_bytes"),
    )
    vault.store_many(
        db,
        conn,
        ctx.keys,
        [
            vault.VaultRecords(item.study_key, item.result.sop_key, item.result.vault_study,
                               item.result.vault_instance)
            for item in items
        ],
    )
    db.prepared(("deid", "instance-done"), lambda: update(Instance).where(
        Instance.id == bindparam("b_id")).values(
            state=InstanceState.DEIDENTIFIED.value,
            blob_ref=bindparam("b_ref"),
            reject_reason=None,
            updated_at=bindparam("b_now"),
    )).run_many(conn, [{"b_id": item.instance_id, "b_ref": item.blob_ref, "b_now": now}
                       for item in items])
    db.prepared(("deid", "audit"), lambda: (insert(AuditEvent).values(
        {name: bindparam(name) for name in ("at", "event", "outcome", "actor", "detail")}),
        AuditEvent.__table__)).run_many(
        conn,
        [
            {
                "at": now,
                "event": AuditKind.DEIDENTIFIED.value,
                "outcome": "success",
                "actor": None,
                "detail": {
                    "sop_key": item.result.sop_key,
                    "study_key": item.study_key,
                    "series_key": item.series_key,
                    "blob": item.blob_ref,
                    "methods": [c.value for c in item.result.options],
                    "pixel_rule": item.result.pixel_rule,
                },
            }
            for item in items
        ],
    )


def _select_study(for_update: bool) -> Any:
    query = select(
        Study.state, Study.version, Study.patient_key, Study.accession_key
    ).where(Study.study_key == bindparam("key"))
    return query.with_for_update() if for_update else query


def _discard_blobs(ctx: JobContext, items: list[_Prepared], error: Exception) -> None:
    """Remove the blobs of *items*, whose transaction failed with *error* (no row names
    them; the job's retry stores its blob again). After a :class:`StorageError` the outcome
    of the commit is unknown: the rows may have landed, so the blobs stay, and
    :func:`sweep_orphan_blobs` removes them later if no row names them."""
    if isinstance(error, StorageError):
        return
    try:
        ctx.blobs.delete_many([item.blob_ref for item in items if item.blob_ref])
    except StorageError as exc:
        logger.warning("could not remove the blobs of a failed transaction: %s", exc)


def _finish(ctx: JobContext, items: list[_Prepared]) -> None:
    """Step 6: the spool items go, only after the commit (adjacent records in one go:
    :meth:`storage.spool.Spool.delete_many`; each was read and authenticated by step 1)."""
    ctx.spool.delete_many([item.spool_name for item in items], verified=True)
    if not logger.isEnabledFor(logging.INFO):
        return
    for item in items:
        result = item.result
        logger.info(
            "instance %d de-identified: study %s, %d bytes, %s%s",
            item.instance_id,
            short_key(item.study_key),
            item.size,
            "+".join(c.value for c in result.options),
            f", pixels cleaned by rule {result.pixel_rule!r}" if result.pixels_cleaned else "",
            extra={"instance_id": item.instance_id, "study_key": item.study_key},
        )


class _RolledBack(Exception):
    """Ends the warm-up's transaction without committing it."""


@register_warm_up(JobKind.DEIDENTIFY)
def warm_up(ctx: JobContext) -> None:
    """Build the engine and compile the record transaction's statements when the worker
    starts: step 5 for a synthetic instance, rolled back. Compiled by the first batch
    instead, they kept the write turn ~20 ms longer while the SCP's commits waited for it."""
    key = "warm-up"  # no real key has this form (they are 2.25. UIDs)
    result = DeidResult(
        data=b"", transfer_syntax="", sop_class_uid="", sop_key=key, study_key=key,
        series_key=key, patient_key=key, accession_key=None, modality=None, body_part=None,
        view_position=None, options=(), pixels_cleaned=False, pixel_rule=None, residue=(),
        vault_study=b"", vault_instance=b"",
    )
    try:
        with ctx.db.transaction() as conn:
            _record_batch(conn, ctx, [_Prepared(-1, key, key, "", result, key, len(result.data))])
            raise _RolledBack
    except _RolledBack:
        pass
    engine_for(ctx.settings, ctx.keys)  # Table E.1-1 read and compiled: ~35 ms, once
    _BatchIO.of_process().start()


def _reject(ctx: JobContext, instance_id: int, sop_key: str, study_key: str, reason: str) -> None:
    with ctx.db.session() as s:
        s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(
                state=InstanceState.REJECTED.value,
                reject_reason=reason,
                updated_at=datetime.now(UTC),
            )
        )
        record(
            s,
            AuditKind.INSTANCE_REJECTED,
            outcome="failure",
            sop_key=sop_key,
            study_key=study_key,
            reason=reason,
        )
    logger.warning("instance %d not admitted: %s", instance_id, reason)


@periodic("deid-sweep-rejected", SWEEP_SECONDS, kind=JobKind.DEIDENTIFY)
def sweep_rejected(ctx: JobContext) -> None:
    """Periodic worker sweep: :func:`remove_rejected_spool` every ``SWEEP_SECONDS``."""
    remove_rejected_spool(ctx)


@periodic("spool-sweep-orphans", SWEEP_SECONDS, kind=JobKind.DEIDENTIFY)
def sweep_orphans(ctx: JobContext) -> None:
    """Periodic worker sweep: :func:`remove_orphan_spool` every ``SWEEP_SECONDS``."""
    remove_orphan_spool(ctx)


def remove_orphan_spool(ctx: JobContext, *, older_than_seconds: float = ORPHAN_AGE_SECONDS) -> int:
    """Delete spool items that no instance still needs, once older than *older_than_seconds*,
    then the segments left empty; return how many items.

    Orphans come from a kill between the spool write and the commit of its row (the store
    was never acknowledged, the peer sends it again), and from a deletion after
    de-identification that a crash undid (deletions are not synced). The age guard keeps an
    item whose row is being committed right now.
    """
    removed = 0
    candidates = ctx.spool.names_older_than(older_than_seconds)
    for start in range(0, len(candidates), _IN_CHUNK):
        chunk = candidates[start : start + _IN_CHUNK]
        with ctx.db.read() as conn:
            needed = set(
                conn.execute(
                    select(Instance.spool_name).where(
                        Instance.spool_name.in_(chunk),
                        Instance.state != InstanceState.DEIDENTIFIED.value,
                    )
                ).scalars()
            )
        for name in chunk:
            if name not in needed:
                ctx.spool.delete(name)
                removed += 1
    if removed:
        logger.info("removed %d orphan spool item(s)", removed)
    segments = ctx.spool.remove_empty_segments(older_than_seconds)
    if segments:
        logger.info("removed %d empty spool segment(s)", segments)
    return removed


@periodic("blobs-sweep-orphans", BLOB_SWEEP_SECONDS, kind=JobKind.DEIDENTIFY)
def sweep_orphan_blobs(ctx: JobContext) -> None:
    """Periodic worker sweep: :func:`remove_orphan_blobs` every ``BLOB_SWEEP_SECONDS``."""
    remove_orphan_blobs(ctx)


def remove_orphan_blobs(
    ctx: JobContext,
    *,
    older_than_seconds: float = ORPHAN_AGE_SECONDS,
    window_seconds: float = BLOB_SWEEP_WINDOW_SECONDS,
) -> int:
    """Delete blobs that no ``deid_instances`` row names, once older than
    *older_than_seconds*, from the packs written to in the last *window_seconds*; return
    how many.

    Orphan blobs come from a worker killed between storing a batch's blobs and committing
    its rows, or from a commit whose outcome was unknown and that did not land (the job's
    retry stores the blob again). The age guard keeps a blob whose row is being committed.
    """
    removed = 0
    packs = ctx.blobs.packs
    candidates = packs.names_older_than(older_than_seconds, modified_within=window_seconds)
    for start in range(0, len(candidates), _IN_CHUNK):
        chunk = candidates[start : start + _IN_CHUNK]
        with ctx.db.read() as conn:
            needed = set(
                conn.execute(
                    select(DeidInstance.blob_ref).where(DeidInstance.blob_ref.in_(chunk))
                ).scalars()
            )
        orphans = [ref for ref in chunk if ref not in needed]
        packs.delete_many(orphans)
        removed += len(orphans)
    if removed:
        logger.info("removed %d orphan blob(s)", removed)
    return removed


def remove_rejected_spool(ctx: JobContext) -> int:
    """Delete the spool items of rejected instances older than the retention; return how many.

    Safe in several worker processes at once: deleting a spool item is idempotent, and the row
    keeps no spool name afterwards.
    """
    hours = ctx.settings.spool.reject_retention_hours
    cutoff = datetime.now(UTC) - timedelta(hours=hours)
    with ctx.db.session() as s:
        due = s.execute(
            select(Instance.id, Instance.spool_name).where(
                Instance.state == InstanceState.REJECTED.value,
                Instance.spool_name.is_not(None),
                Instance.updated_at <= cutoff,
            )
        ).all()
    removed = 0
    for instance_id, name in due:
        if name:
            ctx.spool.delete(name)
        with ctx.db.session() as s:
            s.execute(
                update(Instance)
                .where(Instance.id == instance_id, Instance.state == InstanceState.REJECTED.value)
                .values(spool_name=None)
            )
        removed += 1
    if removed:
        logger.info("removed the spool items of %d rejected instance(s)", removed)
    return removed
