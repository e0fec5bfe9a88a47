"""The ``export`` stage: C-STORE each report's SR to each configured destination.

One ``export`` job per (report, destination) (dedupe key ``export:<report id>:<destination>``),
queued by the report stage in the transaction that records the report, so a node killed between
report and export finds the job at restart. The job reads the SR from the encrypted outbox,
decrypts it in memory and sends it with :func:`node.dicom.scu.store` (TCP_NODELAY, a fresh
association per attempt).

Retries are per destination: a destination that is down, refuses the association or answers
with a failure status makes the job fail, and the worker retries it with exponential backoff
(``[workers] backoff_seconds``, doubling, capped at ``backoff_max_seconds``) up to
``[export] max_attempts``; then the job is dead-lettered and the delivery is ``dead`` (``fednode
exports list`` shows it, ``fednode exports retry`` re-queues it). A destination that accepts no
presentation context for the SR's SOP class is dead-lettered at once (retrying cannot help;
try ``[export] sr_format = "enhanced"``). Each delivery row counts its attempts and keeps the
last status and error (never PHI: the peer's error comment is not kept).

Delivery is at least once: a node killed after the PACS acknowledged but before the row was
updated sends the SR again; the SR's SOP Instance UID is the same (it is derived from the
node's key, the study and the version), so the PACS recognises the re-send.

When every delivery of a report is ``sent`` the report is ``exported``; the report stage's
sweep deletes its outbox file after ``[export] retention_hours``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.audit import audit
from node.config import Settings
from node.errors import ConfigError, NetworkError, NodeError
from node.jobs import ExportPayload, JobContext, JobKind, PermanentJobError, enqueue, register
from storage.audit import AuditKind
from storage.errors import IntegrityError, StorageError
from storage.models import JobRow, Report, ReportExport
from storage.outbox import Outbox
from storage.records import ExportState, Job, ReportState

logger = logging.getLogger(__name__)

EXPORT_KIND = JobKind.EXPORT.value


class ExportFailed(NodeError):
    """The destination did not acknowledge the SR (the job is retried)."""


@dataclass(frozen=True)
class Destination:
    """A resolved export destination."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae: str

    @property
    def label(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def destinations(settings: Settings) -> dict[str, Destination]:
    """The configured export destinations by name (``[[export.destinations]]``).

    A destination with ``peer`` takes the AE title, host and port of the ``[[dicom.peers]]``
    entry with that AE title (its own ``ae_title``, ``host`` or ``port`` override them).

    Raises
    ------
    ConfigError
        Naming the key and the fix, if a destination lacks an address or names no peer.
    """
    out: dict[str, Destination] = {}
    peers = {p.ae_title: p for p in settings.dicom.peers}
    for index, dest in enumerate(settings.export.destinations):
        key = f"export.destinations[{index}]"
        ae, host, port = dest.ae_title, dest.host, dest.port
        if dest.peer is not None:
            peer = peers.get(dest.peer)
            if peer is None:
                raise ConfigError(
                    f"{key}.peer = {dest.peer!r} names no [[dicom.peers]] entry; fix: add the "
                    "peer, or give ae_title, host and port in the destination"
                )
            ae, host, port = ae or peer.ae_title, host or peer.host, port or peer.port
        missing = [k for k, v in (("ae_title", ae), ("host", host), ("port", port)) if not v]
        if missing:
            raise ConfigError(
                f"{key} has no {', '.join(missing)}; fix: give ae_title, host and port, or "
                "peer = the AE title of a [[dicom.peers]] entry that has host and port"
            )
        assert ae is not None and host is not None and port is not None
        name = dest.name or ae.strip().lower().replace(" ", "_")
        if name in out:
            raise ConfigError(
                f"{key}: a second destination is named {name!r}; fix: give each a distinct name"
            )
        out[name] = Destination(
            name=name,
            ae_title=ae,
            host=host,
            port=port,
            calling_ae=dest.calling_ae or settings.node.ae_title,
        )
    return out


def outbox_of(ctx: JobContext) -> Outbox:
    """The node's outbox (``<data_dir>/outbox``, under the outbox key)."""
    return Outbox(ctx.settings.outbox_dir, ctx.keys.outbox)


def export_dedupe_key(report_id: int, destination: str) -> str:
    return f"{EXPORT_KIND}:{report_id}:{destination}"


def queue_exports(
    ctx: JobContext, session: Session, report_id: int, names: Iterable[str]
) -> int:
    """Add the deliveries of *report_id* to *names* that do not exist yet, with their jobs.

    Runs in the caller's transaction; returns how many deliveries were added.
    """
    have = set(
        session.execute(
            select(ReportExport.destination).where(ReportExport.report_id == report_id)
        ).scalars()
    )
    added = 0
    for name in names:
        if name in have:
            continue
        session.add(
            ReportExport(report_id=report_id, destination=name, state=ExportState.QUEUED.value)
        )
        enqueue(
            ctx.queue,
            ExportPayload(report_id, name),
            dedupe_key=export_dedupe_key(report_id, name),
            max_attempts=ctx.settings.export.max_attempts,
            session=session,
        )
        added += 1
    return added


def _record(
    ctx: JobContext,
    delivery_id: int,
    state: ExportState,
    *,
    error: str | None = None,
    status: int | None = None,
) -> None:
    now = datetime.now(UTC)
    with ctx.db.session() as session:
        row = session.get(ReportExport, delivery_id)
        if row is None:
            return
        row.state = state.value
        row.last_error = error
        if status is not None:
            row.last_status = status
        if state is ExportState.SENT:
            row.acked_at = now
            session.flush()
            states = set(
                session.execute(
                    select(ReportExport.state).where(ReportExport.report_id == row.report_id)
                ).scalars()
            )
            if states == {ExportState.SENT.value}:
                session.execute(
                    update(Report)
                    .where(Report.id == row.report_id, Report.state == ReportState.PENDING.value)
                    .values(state=ReportState.EXPORTED.value, exported_at=now)
                )


def export_one(ctx: JobContext, report_id: int, destination: str, *, attempt: int = 1,
               max_attempts: int = 1) -> ExportState:
    """Send report *report_id* to *destination*; the body of the ``export`` job.

    Returns
    -------
    ExportState
        ``SENT`` (now or before) or ``CANCELLED`` (the report was superseded first).

    Raises
    ------
    PermanentJobError
        The report or destination is gone, the SR left the outbox, or the destination refuses
        the SR's SOP class.
    ExportFailed
        The destination did not acknowledge (the worker retries).
    """
    from node.dicom.scu import ContextRefused, PeerAddress, StoreRefused, store

    with ctx.db.session() as session:
        report = session.get(Report, report_id)
        if report is None:
            raise PermanentJobError(f"report {report_id} does not exist")
        row = session.execute(
            select(ReportExport).where(
                ReportExport.report_id == report_id, ReportExport.destination == destination
            )
        ).scalar_one_or_none()
        if row is None:  # a job without its row (cannot happen through queue_exports)
            row = ReportExport(
                report_id=report_id, destination=destination, state=ExportState.QUEUED.value
            )
            session.add(row)
            session.flush()
        if row.state == ExportState.SENT.value:
            return ExportState.SENT
        if report.state == ReportState.SUPERSEDED.value or row.state == ExportState.CANCELLED:
            row.state = ExportState.CANCELLED.value
            return ExportState.CANCELLED
        row.attempts += 1
        row.state = ExportState.QUEUED.value
        delivery_id, outbox_name = row.id, report.outbox_name
    dest = destinations(ctx.settings).get(destination)
    if dest is None:
        message = f"export destination {destination!r} is no longer configured"
        _record(ctx, delivery_id, ExportState.DEAD, error=message)
        raise PermanentJobError(message)
    if outbox_name is None:
        message = f"the SR of report {report_id} is no longer in the outbox"
        _record(ctx, delivery_id, ExportState.DEAD, error=message)
        raise PermanentJobError(message)
    try:
        data = outbox_of(ctx).get(outbox_name)
    except IntegrityError as exc:
        _record(ctx, delivery_id, ExportState.DEAD, error=str(exc))
        raise PermanentJobError(str(exc)) from exc
    except StorageError as exc:
        _record(ctx, delivery_id, ExportState.DEAD, error=str(exc))
        raise PermanentJobError(str(exc)) from exc
    peer = PeerAddress(dest.ae_title, dest.host, dest.port)
    try:
        outcome = store(
            peer, data, calling_ae=dest.calling_ae, timeout=ctx.settings.export.timeout_seconds
        )
    except ContextRefused as exc:
        message = f"{exc}; try [export] sr_format = \"enhanced\" if the PACS stores Enhanced SR"
        _record(ctx, delivery_id, ExportState.DEAD, error=message)
        audit(
            ctx.db, ctx.settings.data_dir, AuditKind.REPORT_EXPORTED, outcome="failure",
            actor=dest.calling_ae, report_id=report_id, destination=destination,
            peer_ae=dest.ae_title, error="no presentation context for the SR class",
        )
        raise PermanentJobError(message) from exc
    except (NetworkError, StoreRefused) as exc:
        status = exc.status if isinstance(exc, StoreRefused) else None
        final = attempt >= max_attempts
        _record(
            ctx,
            delivery_id,
            ExportState.DEAD if final else ExportState.QUEUED,
            error=str(exc),
            status=status,
        )
        logger.warning(
            "report %d to %s: attempt %d/%d failed: %s",
            report_id, destination, attempt, max_attempts, exc,
        )
        raise ExportFailed(str(exc)) from exc
    _record(ctx, delivery_id, ExportState.SENT, status=outcome.status)
    audit(
        ctx.db, ctx.settings.data_dir, AuditKind.REPORT_EXPORTED, actor=dest.calling_ae,
        report_id=report_id, destination=destination, peer_ae=dest.ae_title,
        status=outcome.status, attempt=attempt,
    )
    logger.info(
        "report %d sent to %s (%s) in %.3f s, status 0x%04X",
        report_id, destination, dest.label, outcome.seconds, outcome.status,
    )
    return ExportState.SENT


def retry_exports(ctx: JobContext, delivery_ids: Iterable[int] | None = None) -> int:
    """Re-queue dead deliveries (all, or those in *delivery_ids*) with a fresh attempt budget.

    Returns how many were re-queued.
    """
    with ctx.db.session() as session:
        query = select(ReportExport).where(ReportExport.state == ExportState.DEAD.value)
        if delivery_ids is not None:
            query = query.where(ReportExport.id.in_(list(delivery_ids)))
        rows = session.execute(query).scalars().all()
        keys = {export_dedupe_key(r.report_id, r.destination): r.id for r in rows}
        jobs: dict[str | None, int] = {
            key: job_id
            for key, job_id in session.execute(
                select(JobRow.dedupe_key, JobRow.id).where(JobRow.dedupe_key.in_(list(keys)))
            )
        }
        for row in rows:
            row.state = ExportState.QUEUED.value
            row.attempts = 0
            row.last_error = None
        missing = [k for k in keys if k not in jobs]
        for key in missing:  # the dead job was purged: queue a fresh one
            report_id, destination = key.split(":", 2)[1:]
            enqueue(
                ctx.queue,
                ExportPayload(int(report_id), destination),
                dedupe_key=key,
                max_attempts=ctx.settings.export.max_attempts,
                session=session,
            )
    dead = [jobs[k] for k in keys if k in jobs]
    if dead:
        requeued = ctx.queue.retry(dead)
        if requeued < len(dead):
            logger.warning("%d export job(s) were not dead any more", len(dead) - requeued)
    return len(keys)


@register(JobKind.EXPORT)
def handle_export(job: Job, payload: ExportPayload, ctx: JobContext) -> None:
    """The ``export`` job: :func:`export_one` with the job's attempt count."""
    export_one(
        ctx,
        payload.report_id,
        payload.destination,
        attempt=job.attempts,
        max_attempts=job.max_attempts,
    )

