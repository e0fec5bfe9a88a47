"""Durable receipt of one C-STORE: the work between "dataset received" and "status sent".

Order (PS3.4 B.2.3: a success status means the SCP has taken responsibility for the instance):

1. refuse an instance larger than the maximum instance size, or a deflated one that would
   inflate beyond the inflation limit (0xA700, audited; the SCP's fast path has already
   discarded the fragments of a data set beyond the size as they arrived);
2. validate the encoding (every item of every sequence, as the de-identifier walks it) and
   the four UIDs (failure statuses 0xC000 family, 0xA900); check the data volume's free-space
   floor (0xA700 below it);
3. encrypt the received bytes into the spool (AES-GCM, a record appended to this process's
   spool segment, see :mod:`storage.spool`);
4. make the record durable and, in one database transaction, insert the instance row and its
   ``deidentify`` job;
5. only then answer 0x0000.

If step 3 or 4 fails the record is deleted and the SCP answers 0xA700: nothing is
acknowledged that is not kept. Only when the database fails during the commit itself is the
record left in place: the row may have landed, and the peer's re-send will be acknowledged as
its duplicate (the orphan sweep deletes the record later if no row names it).

A re-send of a known SOP Instance UID is acknowledged without a second row or job: the
insert does nothing on the existing key and the new record is deleted (no lookup before the
write: re-sends are rare, and a lookup per instance cost more than the occasional discarded
record). Every identifier written in clear is the keyed pseudonym of a UID.

Group commit (step 4): the concurrent stores of one SCP process commit together. One of them
(the leader, see :class:`_GroupCommitter`) syncs the spool: one ``fdatasync`` makes every
record written for the batch durable, before any row refers to them. It then writes every
waiting row in one transaction (each instance's row and job together in it); each store
answers only after the transaction holding its row has committed. A commit costs an fsync of
the WAL and, on SQLite, a turn of the single write lock that all processes queue for; under
concurrent associations one commit covers several instances, a lone association commits its
own. If a batch fails for any reason other than the database or spool being unavailable, its
instances are retried one transaction each, so one bad row cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.audit import audit
from node.deid.pseudonyms import uid_pseudonym
from node.dicom.inspect import DatasetHeader, inspect_dataset
from node.dicom.status import Status
from node.errors import InstanceTooLarge, MalformedDataset
from node.jobs import RECEIVE_STAMP_NAME, DeidentifyPayload, deidentify_dedupe_key, enqueue
from storage.audit import AuditKind
from storage.db import Database, PreparedInsert
from storage.errors import CommitOutcomeUnknown, DatabaseUnavailable, StorageError
from storage.files import free_bytes
from storage.models import Instance
from storage.queue import JobQueue
from storage.records import InstanceState
from storage.spool import Spool
from storage.turn import ReceiveStamp

logger = logging.getLogger(__name__)

_ROW_COLUMNS = ("sop_key", "study_key", "series_key", "sop_class_uid", "transfer_syntax_uid",
                "calling_ae", "size_bytes", "state", "spool_name")
# Most instances one group commit writes (bounds the transaction and the wait behind it).
MAX_BATCH = 64


@dataclass(frozen=True)
class Outcome:
    """The answer to one C-STORE: a status, an error comment (≤ 64 chars, no PHI)."""

    status: Status
    comment: str = ""
    sop_key: str | None = None
    study_key: str | None = None
    duplicate: bool = False


class Receiver:
    """Keeps received instances durably: encrypted spool + one database transaction."""

    def __init__(
        self,
        *,
        db: Database,
        queue: JobQueue,
        spool: Spool,
        site_key: bytes,
        data_dir: Path,
        free_space_floor_bytes: int,
        max_instance_bytes: int | None = None,
        max_inflated_bytes: int | None = None,
    ) -> None:
        self.db = db
        self.queue = queue
        self.spool = spool
        self.site_key = site_key
        self.data_dir = data_dir
        self.floor = free_space_floor_bytes
        self.max_instance = max_instance_bytes
        self.max_inflated = max_inflated_bytes
        self._insert_row = PreparedInsert(db, Instance.__table__, _ROW_COLUMNS, "sop_key")
        self._stamp = ReceiveStamp(data_dir / RECEIVE_STAMP_NAME)
        self._committer = _GroupCommitter(self._write_rows, self._writer_turn)

    def store(
        self,
        raw: bytes | bytearray | memoryview,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        calling_ae: str,
    ) -> Outcome:
        """Validate, keep and queue one received dataset; return the status to answer."""
        if self.max_instance is not None and len(raw) > self.max_instance:
            return self.refuse_oversized(calling_ae, len(raw))
        try:
            header, missing = inspect_dataset(
                raw, transfer_syntax, max_inflated=self.max_inflated
            )
        except InstanceTooLarge:
            return self._refuse(
                Status.OUT_OF_RESOURCES, "deflated dataset inflates beyond the limit", calling_ae
            )
        except MalformedDataset as exc:
            return self._refuse(Status.CANNOT_UNDERSTAND, str(exc), calling_ae)
        if header is None:
            return self._refuse(
                Status.CANNOT_UNDERSTAND_MISSING_UID, "missing " + ", ".join(missing), calling_ae
            )
        if header.sop_instance_uid != sop_instance_uid.strip("\x00 "):
            return self._refuse(
                Status.CANNOT_UNDERSTAND_UID_MISMATCH,
                "SOP Instance UID differs from the request",
                calling_ae,
            )
        if header.sop_class_uid != sop_class_uid.strip("\x00 "):
            return self._refuse(
                Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOP Class UID differs from the request",
                calling_ae,
            )
        try:
            if free_bytes(self.data_dir) - len(raw) < self.floor:
                return self._refuse(
                    Status.OUT_OF_RESOURCES, "data volume below free-space floor", calling_ae
                )
        except OSError:
            return self._refuse(Status.OUT_OF_RESOURCES, "data volume unavailable", calling_ae)
        return self._keep(raw, header, transfer_syntax, calling_ae)

    def _keep(
        self,
        raw: bytes | bytearray | memoryview,
        header: DatasetHeader,
        transfer_syntax: str,
        calling_ae: str,
    ) -> Outcome:
        sop_key = uid_pseudonym(self.site_key, header.sop_instance_uid)
        study_key = uid_pseudonym(self.site_key, header.study_instance_uid)
        series_key = uid_pseudonym(self.site_key, header.series_instance_uid)
        try:
            spool_name = self.spool.put(raw)  # durable once the committer has synced
        except StorageError:  # put leaves no record behind
            return self._refuse(Status.OUT_OF_RESOURCES, "spool write failed", calling_ae)
        row = {
            "sop_key": sop_key,
            "study_key": study_key,
            "series_key": series_key,
            "sop_class_uid": header.sop_class_uid,
            "transfer_syntax_uid": str(transfer_syntax),
            "calling_ae": calling_ae,
            "size_bytes": len(raw),
            "state": InstanceState.RECEIVED.value,
            "spool_name": spool_name,
        }
        try:
            instance_id = self._committer.write(row)
        except CommitOutcomeUnknown:
            # The row may have landed: its record stays (were it deleted, the peer's re-send
            # would be acknowledged as a duplicate of a row without bytes). The orphan sweep
            # deletes it later if no row names it.
            return self._refuse(Status.OUT_OF_RESOURCES, "database unavailable", calling_ae)
        except StorageError:
            self._discard(spool_name)
            return self._refuse(Status.OUT_OF_RESOURCES, "database unavailable", calling_ae)
        except BaseException:
            self._discard(spool_name)  # nothing half-written; the SCP answers a failure
            raise
        if instance_id is None:  # a re-send: the instance is already kept and queued
            self._discard(spool_name)
            return Outcome(Status.SUCCESS, sop_key=sop_key, study_key=study_key, duplicate=True)
        return Outcome(Status.SUCCESS, sop_key=sop_key, study_key=study_key)

    def _write_rows(self, rows: list[dict[str, Any]]) -> list[int | None]:
        """Make the rows' spool records durable, then insert *rows* and a
        ``deidentify`` job for each new one, in one transaction.

        Returns each row's instance id, ``None`` where the SOP Instance was already known.
        """
        self.spool.sync()
        ids: list[int | None] = []
        committing = False
        try:
            with self.db.transaction() as conn:
                for row in rows:
                    instance_id = self._insert_row(conn, row)
                    if instance_id is not None:
                        enqueue(
                            self.queue,
                            DeidentifyPayload(instance_id),
                            dedupe_key=deidentify_dedupe_key(row["sop_key"]),
                            session=conn,
                        )
                    ids.append(instance_id)
                committing = True  # leaving the block commits
        except DatabaseUnavailable as exc:
            if committing:
                raise CommitOutcomeUnknown(str(exc)) from exc
            raise
        return ids

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Hold the database's write turn (:mod:`storage.turn`, SQLite only) as its priority
        writer: blocked on an ``flock`` shared by every writer of the node, the leader wakes
        as soon as the turn is free (its batch has grown meanwhile), where SQLite's own busy
        handler would sleep 1, 2, 5 … 100 ms between attempts; the workers and the CLI poll
        for the turn, so the SCP goes first when both wait."""
        # The records written so far become durable before queueing for the lock, not while
        # holding it (the sync in _write_rows then covers only rows that arrived meanwhile).
        self.spool.sync()
        try:
            with self.db.write_turn(priority=True):
                yield
        finally:  # the workers follow this (node.worker): new jobs, a burst under way
            self._stamp.mark()

    def _discard(self, spool_name: str) -> None:
        try:
            self.spool.delete(spool_name)
        except StorageError:
            logger.error("could not remove spool item %s after a failed store", spool_name)

    def refuse_oversized(self, calling_ae: str, size: int) -> Outcome:
        """The answer to an instance larger than the maximum instance size (audited)."""
        logger.warning("C-STORE of %d bytes exceeds the maximum instance size", size)
        return self._refuse(
            Status.OUT_OF_RESOURCES, "instance exceeds the maximum instance size", calling_ae
        )

    def _refuse(self, status: Status, comment: str, calling_ae: str) -> Outcome:
        logger.warning(
            "C-STORE refused: status=0x%04X calling_ae=%s reason=%s", status, calling_ae, comment
        )
        audit(
            self.db,
            self.data_dir,
            AuditKind.STORE_FAILED,
            outcome="failure",
            actor=calling_ae,
            status=f"0x{status:04X}",
            reason=comment,
        )
        return Outcome(status, comment[:64])


@dataclass
class _Waiting:
    row: dict[str, Any]
    finished: bool = False
    instance_id: int | None = None
    error: BaseException | None = None


class _GroupCommitter:
    """Leader/follower group commit of rows through *write* (rows → ids, one transaction).

    The first store to arrive while no transaction is running becomes the leader. It takes
    the node-wide writer turn (*turn*, see :meth:`Receiver._writer_turn`) and only then every
    row waiting (its own included, up to ``MAX_BATCH``): the rows that arrived while another
    process held the turn join the batch. It runs the transaction and wakes the others;
    stores arriving meanwhile wait, and one of them leads the next batch. Uncontended, a store
    commits its own row in its own thread (no hand-off); contended, one transaction covers
    many rows.
    """

    def __init__(self, write: Any, turn: Any) -> None:
        self._write = write
        self._turn = turn
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._busy = False

    def write(self, row: dict[str, Any]) -> int | None:
        """Write *row*; return its id once its transaction has committed (or raise)."""
        item = _Waiting(row)
        with self._cond:
            self._waiting.append(item)
            while not item.finished:
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy = True
                self._cond.release()
                try:
                    self._lead()
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.instance_id

    def _take(self) -> list[_Waiting]:
        with self._cond:
            batch = self._waiting[:MAX_BATCH]
            del self._waiting[:MAX_BATCH]
        return batch

    def _lead(self) -> None:
        with ExitStack() as stack:
            try:
                stack.enter_context(self._turn())
            except Exception as exc:  # no turn, no transaction: the waiting stores fail
                self._finish(self._take(), exc)
                return
            self._commit(self._take())

    def _commit(self, batch: list[_Waiting]) -> None:
        try:
            ids = self._write([item.row for item in batch])
        except StorageError as exc:  # the database or spool is unavailable: every store fails
            self._finish(batch, exc)
            return
        except Exception as exc:
            if len(batch) == 1:  # raised again in the store that wrote this row
                self._finish(batch, exc)
                return
            for item in batch:  # isolate the failing row: one transaction each
                self._commit([item])
            return
        except BaseException as exc:
            self._finish(batch, exc)
            raise
        for item, instance_id in zip(batch, ids, strict=True):
            item.instance_id = instance_id
            item.finished = True

    @staticmethod
    def _finish(batch: list[_Waiting], error: BaseException) -> None:
        for item in batch:
            item.error = error
            item.finished = True
