"""The ``report`` stage: a result becomes a TID 1500 SR in the encrypted outbox, then exports.

How a result gets here: the stage owns a periodic sweep (:func:`report_sweep`, every
``[export] sweep_seconds`` in the workers that serve ``report``) that queues one ``report`` job
per result that has none yet (dedupe key ``report:<result id>``). The inference stage needs no
hook into this one, and a result written while no worker served reports (or before an upgrade
that added the stage) is reported when one does.

The job (:func:`build_for_result`):

1. skips a result that is superseded or whose study has a newer version (a newer result
   follows);
2. decides the reported class with :meth:`plugins.base.TaskPlugin.decide` from the result's
   probability;
3. reads the original Patient/Study header and the original instance UIDs from the vault
   (:func:`node.deid.vault.load_study`, :func:`~node.deid.vault.load_instances`) and the
   geometry of the images the task accepts from their de-identified headers;
4. references the newest exported SR of an earlier version of the study (Predecessor Documents
   Sequence) and marks unsent reports of earlier versions superseded (they are not sent);
5. builds the SR (:func:`node.report.builder.build_report`), writes it to the outbox
   (``report-<result id>``, AES-256-GCM, durable), and in one transaction records the report,
   one delivery per destination and their ``export`` jobs.

The SR's UIDs are derived from the node's site key, the study's pseudonymous key, the task and
the version, so a job that runs again after a crash writes the same SR (same SOP Instance UID).

The sweep also adds deliveries for destinations configured after a report was built, deletes
outbox files of reports exported (or superseded) longer than ``[export] retention_hours`` ago,
and removes outbox files no report names (a kill between the file and the transaction).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset
from sqlalchemy import String, case, cast, exists, func, literal, select, update
from sqlalchemy.exc import IntegrityError as SqlIntegrityError

from node import __version__
from node.deid import vault
from node.errors import PluginError
from node.jobs import (
    JobContext,
    JobKind,
    PermanentJobError,
    ReportPayload,
    enqueue,
    periodic,
    register,
)
from node.logs import short_key
from node.pipeline.export import destinations, outbox_of, queue_exports
from node.report.builder import (
    DocumentReference,
    ReportError,
    ReportFinding,
    ReportIdentity,
    build_report,
    encode_report,
    evidence_image,
    report_uid,
    warm_up,
)
from node.report.codes import SR_FORMATS
from node.tasks.studies import StudyDataError, instances_of, read_header, safe_accepts
from plugins.base import TaskPlugin
from storage.audit import AuditKind, record
from storage.errors import StorageError
from storage.models import JobRow, Report, ReportExport, Result, Study
from storage.records import ExportState, Job, ReportState

logger = logging.getLogger(__name__)

REPORT_KIND = JobKind.REPORT.value
BATCH = 200
ORPHAN_SECONDS = 3600.0
"""An outbox file no report names is deleted after this long (the job may still commit)."""


def report_dedupe_key(result_id: int) -> str:
    return f"{REPORT_KIND}:{result_id}"


def outbox_name(result_id: int) -> str:
    return f"report-{result_id}"


def sr_series_uid(site_key: bytes, study_key: str, task: str) -> str:
    """The node's SR series of *task* in a study (every version's SR is in it)."""
    return report_uid(site_key, "series", study_key, task)


def sr_instance_uid(site_key: bytes, study_key: str, task: str, version: int) -> str:
    """The SOP Instance UID of *task*'s SR for one version of a study."""
    return report_uid(site_key, "instance", study_key, task, str(version))


def device_uid(site_key: bytes) -> str:
    """Device Observer UID of this node (TID 1004)."""
    return report_uid(site_key, "device")


def _images(
    ctx: JobContext, plugin: TaskPlugin, study: Dataset, study_key: str
) -> list[Dataset]:
    """Evidence datasets of the images *plugin* accepts in the study (original UIDs)."""
    originals = vault.load_instances(ctx.db, ctx.keys, study_key)
    with ctx.db.session() as session:
        stored = instances_of(session, study_key)
    headers: dict[str, Dataset] = {}
    for inst in stored:
        if inst.sop_key not in originals:
            continue
        try:
            headers[inst.sop_key] = read_header(ctx.blobs, inst.blob_ref)
        except (StorageError, StudyDataError) as exc:
            logger.warning(
                "study %s: instance %s not read: %s",
                short_key(study_key), short_key(inst.sop_key), exc,
            )
    accepted = [key for key, header in headers.items() if safe_accepts(plugin, header)]
    if not accepted:
        raise PermanentJobError(
            f"study {study_key} has no instance task {plugin.name} accepts with a vault record"
        )
    try:
        return [evidence_image(study, originals[k], headers[k]) for k in accepted]
    except ReportError as exc:
        raise PermanentJobError(f"study {study_key}: {exc}") from exc


def build_for_result(
    ctx: JobContext, result_id: int, tasks: Mapping[str, TaskPlugin] | None = None
) -> int | None:
    """Build, keep and queue for export the SR of result *result_id* (the ``report`` job).

    Returns
    -------
    int or None
        The report's id (also when it existed already), or ``None`` if the result is stale.

    Raises
    ------
    PermanentJobError
        The result, its task, its probability or its vault record is missing, or the SR cannot
        be built.
    """
    settings = ctx.settings
    names = list(destinations(settings))
    with ctx.db.session() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise PermanentJobError(f"result {result_id} does not exist")
        existing = session.execute(
            select(Report.id).where(Report.result_id == result_id)
        ).scalar_one_or_none()
        if existing is not None:
            queue_exports(ctx, session, existing, names)
            return existing
        current = session.execute(
            select(Study.version).where(Study.study_key == result.study_key)
        ).scalar_one_or_none()
        study_key, task, version = result.study_key, result.task, result.study_version
        probability, superseded = result.probability, result.superseded
        model_id, model_version = result.model_id, result.model_version
        key_id = result.key_id
        previous = session.execute(
            select(Report.study_version, Report.sop_class_uid)
            .where(
                Report.study_key == study_key,
                Report.task == task,
                Report.study_version < version,
                Report.state == ReportState.EXPORTED.value,
            )
            .order_by(Report.study_version.desc())
            .limit(1)
        ).first()
    if superseded or current != version:
        logger.info(
            "result %d (study %s v%d) is superseded by a newer version; not reported",
            result_id, short_key(study_key), version,
        )
        return None
    if tasks is None:
        from node.tasks import load_tasks

        try:
            tasks = load_tasks(settings)
        except PluginError as exc:
            raise PermanentJobError(f"task {task!r} cannot be loaded: {exc}") from exc
    plugin = tasks.get(task)
    if plugin is None:
        raise PermanentJobError(f"task {task!r} is not enabled on this node")
    if probability is None:
        raise PermanentJobError(f"result {result_id} has no probability")
    study = vault.load_study(ctx.db, ctx.keys, study_key)
    if study is None:
        raise PermanentJobError(f"study {study_key} has no vault record")
    images = _images(ctx, plugin, study, study_key)
    decided = plugin.decide(probability)
    threshold = plugin.positive_class.threshold
    assert threshold is not None
    finding = ReportFinding(
        task=plugin.name,
        task_version=plugin.version,
        finding=plugin.finding,
        evaluation=decided.concept,
        probability=probability,
        threshold=threshold,
        model_id=model_id or "unknown",
        model_version=model_version,
        encryption=plugin.he_encoding.scheme,
        encryption_parameters="TenSEAL" + (f", node key {key_id}" if key_id else ""),
    )
    site = ctx.keys.site
    series_uid = sr_series_uid(site, study_key, task)
    identity = ReportIdentity(
        sop_instance_uid=sr_instance_uid(site, study_key, task, version),
        series_instance_uid=series_uid,
        instance_number=version,
        device_uid=device_uid(site),
        device_name=settings.node.ae_title,
        software_version=__version__,
        sr_format=settings.export.sr_format,
    )
    predecessors = []
    if previous is not None:
        predecessors.append(
            DocumentReference(
                study_instance_uid=str(images[0].StudyInstanceUID),
                series_instance_uid=series_uid,
                sop_instance_uid=sr_instance_uid(site, study_key, task, previous[0]),
                sop_class_uid=previous[1],
            )
        )
    try:
        sr = build_report(study, images, finding, identity, predecessors=predecessors)
    except ReportError as exc:
        raise PermanentJobError(f"result {result_id}: {exc}") from exc
    data = encode_report(sr)
    name = outbox_name(result_id)
    size = outbox_of(ctx).put(name, data)
    try:
        with ctx.db.session() as session:
            report = Report(
                result_id=result_id,
                study_key=study_key,
                task=task,
                study_version=version,
                sop_class_uid=SR_FORMATS[settings.export.sr_format],
                state=ReportState.PENDING.value,
                outbox_name=name,
                size_bytes=size,
            )
            session.add(report)
            session.flush()
            report_id = report.id
            older = select(Report.id).where(
                Report.study_key == study_key,
                Report.task == task,
                Report.study_version < version,
                Report.state == ReportState.PENDING.value,
            )
            session.execute(
                update(ReportExport)
                .where(
                    ReportExport.report_id.in_(older),
                    ReportExport.state == ExportState.QUEUED.value,
                )
                .values(state=ExportState.CANCELLED.value)
            )
            session.execute(
                update(Report)
                .where(Report.id.in_(older.scalar_subquery()))
                .values(state=ReportState.SUPERSEDED.value)
            )
            queue_exports(ctx, session, report_id, names)
            record(
                session, AuditKind.REPORT_CREATED, actor=settings.node.ae_title,
                report_id=report_id, study_key=study_key, task=task, study_version=version,
                destinations=names,
            )
    except SqlIntegrityError:
        # Another worker recorded the report first (same result): its row stands.
        with ctx.db.session() as session:
            return session.execute(
                select(Report.id).where(Report.result_id == result_id)
            ).scalar_one()
    logger.info(
        "report %d: study %s v%d task %s -> %s (p=%.3f), %d byte(s) in the outbox, "
        "export queued to: %s",
        report_id, short_key(study_key), version, task, decided.name, probability, size,
        ", ".join(names) or "no destination (kept in the outbox)",
    )
    return report_id


@register(JobKind.REPORT)
def handle_report(job: Job, payload: ReportPayload, ctx: JobContext) -> None:
    """The ``report`` job: :func:`build_for_result`."""
    build_for_result(ctx, payload.result_id)


# -- the sweep -------------------------------------------------------------------------------


def report_sweep(ctx: JobContext, *, now: datetime | None = None) -> dict[str, int]:
    """Queue reports of new results, deliveries to new destinations; purge the outbox.

    Safe in several processes at once (dedupe keys, unique deliveries, idempotent deletes).
    Returns counts of what it did.
    """
    now = now or datetime.now(UTC)
    settings = ctx.settings
    done = {"report_jobs": 0, "deliveries": 0, "purged": 0, "orphans": 0}
    job_key = literal(f"{REPORT_KIND}:") + cast(Result.id, String)
    # Each step looks first without a write transaction and writes only when it found work:
    # the sweep runs every few seconds, and on SQLite a write transaction takes the write
    # turn the SCP's commits wait for.
    with ctx.db.read() as conn:
        new = conn.execute(
            select(Result.id)
            .where(
                Result.superseded.is_(False),
                Result.probability.is_not(None),
                ~exists().where(Report.result_id == Result.id),
                ~exists().where(JobRow.dedupe_key == job_key),
            )
            .order_by(Result.id)
            .limit(BATCH)
        ).scalars().all()
    if new:
        with ctx.db.session() as session:
            for result_id in new:
                job_id = enqueue(
                    ctx.queue,
                    ReportPayload(result_id),
                    dedupe_key=report_dedupe_key(result_id),
                    session=session,
                )
                done["report_jobs"] += job_id is not None
    names = list(destinations(settings))
    if names:
        configured = func.coalesce(
            func.sum(case((ReportExport.destination.in_(names), 1), else_=0)), 0
        )
        with ctx.db.read() as conn:
            short = conn.execute(
                select(Report.id)
                .outerjoin(ReportExport, ReportExport.report_id == Report.id)
                .where(Report.state == ReportState.PENDING.value)
                .group_by(Report.id)
                .having(configured < len(names))
                .limit(BATCH)
            ).scalars().all()
        if short:
            with ctx.db.session() as session:
                for report_id in short:
                    done["deliveries"] += queue_exports(ctx, session, report_id, names)
    done["purged"] = purge_outbox(ctx, now=now)
    done["orphans"] = remove_orphans(ctx)
    if any(done.values()):
        logger.info("report sweep: %s", done)
    return done


def purge_outbox(ctx: JobContext, *, now: datetime | None = None) -> int:
    """Delete the outbox files of reports exported/superseded before the retention period."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(hours=ctx.settings.export.retention_hours)
    box = outbox_of(ctx)
    with ctx.db.read() as conn:
        rows = conn.execute(
            select(Report.id, Report.outbox_name)
            .where(Report.outbox_name.is_not(None))
            .where(
                ((Report.state == ReportState.EXPORTED.value) & (Report.exported_at <= cutoff))
                | ((Report.state == ReportState.SUPERSEDED.value) & (Report.created_at <= cutoff))
            )
            .limit(BATCH)
        ).all()
    purged = 0
    for report_id, name in rows:
        if name is not None:
            box.delete(name)
        with ctx.db.session() as session:
            session.execute(
                update(Report)
                .where(Report.id == report_id)
                .values(outbox_name=None, purged_at=now)
            )
        purged += 1
    return purged


def remove_orphans(ctx: JobContext, *, older_than_seconds: float = ORPHAN_SECONDS) -> int:
    """Delete outbox files that no report names and that are older than *older_than_seconds*."""
    box = outbox_of(ctx)
    box.remove_stale_temporaries(older_than_seconds)
    cutoff = time.time() - older_than_seconds
    candidates = [name for name, mtime in box.names().items() if mtime < cutoff]
    if not candidates:
        return 0
    with ctx.db.read() as conn:
        named = set(
            conn.execute(
                select(Report.outbox_name).where(Report.outbox_name.in_(candidates))
            ).scalars()
        )
    removed = 0
    for name in candidates:
        if name not in named and box.delete(name):
            removed += 1
    return removed


_warmed_up = False


@periodic("report", lambda settings: settings.export.sweep_seconds, kind=JobKind.REPORT)
def report_periodic(ctx: JobContext) -> None:
    """The worker's periodic hook: :func:`report_sweep` every ``[export] sweep_seconds``.

    Its first run in a process (when the worker starts) also loads highdicom's tables, which
    the first SR of the process would otherwise wait for.
    """
    global _warmed_up
    if not _warmed_up:
        warm_up()
        _warmed_up = True
    report_sweep(ctx)
