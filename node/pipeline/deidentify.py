"""The ``deidentify`` job: from the encrypted spool to a de-identified instance (PS3.15 Annex E).

For one received instance (:class:`~node.jobs.DeidentifyPayload`) the handler

1. loads the ``instances`` row and decrypts the spool item (the dataset as received, in the
   negotiated transfer syntax, deflate included);
2. de-identifies it with the node's profile and keys (:class:`node.deid.engine.Deidentifier`);
   an instance the burned-in gate does not admit ends ``rejected`` with its reason and an
   audit record, and its job completes;
3. checks the residue: no value of an identifying attribute of the input may appear in the
   output header, else the job is dead-lettered naming the attributes (never their values);
4. stores the output in the content-addressed blob store;
5. in one transaction: upserts the study (``receiving``, ``last_received_at``, a ``complete``
   study is re-opened with its version incremented), the series (modality, body part, view
   position from the de-identified header) and ``deid_instances``; writes the vault records;
   marks the instance ``deidentified`` with its blob digest; appends the audit record;
6. deletes the spool item, only after the commit.

Every step is idempotent: a job that runs again after a crash finds the blob already stored,
upserts the same rows, or finds the instance ``deidentified`` and only removes a spool item
that a crash left behind. Rejected instances keep their encrypted spool item for
``[spool] reject_retention_hours``; :func:`sweep_rejected` (a periodic worker sweep) removes
it after that.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.config import Settings
from node.deid import vault
from node.deid.engine import Deidentifier, DeidResult
from node.errors import MalformedDataset, RejectedInstance
from node.jobs import DeidentifyPayload, JobContext, JobKind, PermanentJobError, periodic, register
from node.keys import NodeKeys
from node.logs import short_key
from storage.audit import AuditKind, record
from storage.models import DeidInstance, Instance, Series, Study
from storage.records import InstanceState, Job, StudyState

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 600.0
"""How often the workers look for rejected instances whose retention has passed, and for
orphan spool items."""
# A spool item no row names is an orphan once this old (see remove_orphan_spool).
ORPHAN_AGE_SECONDS = 3600.0
_IN_CHUNK = 500

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
    instance_id = payload.instance_id
    try:
        _run(job, ctx, instance_id)
    except PermanentJobError:
        _set_state(ctx, instance_id, InstanceState.FAILED)
        raise
    except Exception:
        if job.attempts >= job.max_attempts:  # the worker dead-letters it after this attempt
            try:
                _set_state(ctx, instance_id, InstanceState.FAILED)
            except Exception as exc:  # keep the original error for the job
                logger.warning("cannot mark instance %d failed: %s", instance_id, exc)
        raise


def _run(job: Job, ctx: JobContext, instance_id: int) -> None:
    with ctx.db.session() as s:
        row = s.get(Instance, instance_id)
        if row is None:
            raise PermanentJobError(f"instance {instance_id} does not exist")
        state, spool_name = row.state, row.spool_name
        syntax, sop_key = row.transfer_syntax_uid, row.sop_key
        study_key, series_key = row.study_key, row.series_key

    if state == InstanceState.DEIDENTIFIED.value:
        if spool_name and ctx.spool.exists(spool_name):
            ctx.spool.delete(spool_name)
        logger.info("instance %d was de-identified already", instance_id)
        return
    if state == InstanceState.REJECTED.value:
        logger.info("instance %d was rejected already", instance_id)
        return
    if not spool_name or not ctx.spool.exists(spool_name):
        raise PermanentJobError(f"the spool item of instance {instance_id} is missing")

    raw = ctx.spool.get(spool_name)
    engine = engine_for(ctx.settings, ctx.keys)
    try:
        result = engine.deidentify(raw, syntax)
    except RejectedInstance as exc:
        _reject(ctx, instance_id, sop_key, study_key, str(exc))
        return
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

    digest = ctx.blobs.put(result.data)
    with ctx.db.session() as s:
        _record(s, ctx, result, instance_id, study_key, series_key, digest)
    ctx.spool.delete(spool_name)
    logger.info(
        "instance %d de-identified: study %s, %d bytes, %s%s",
        instance_id,
        short_key(study_key),
        len(result.data),
        "+".join(c.value for c in result.options),
        f", pixels cleaned by rule {result.pixel_rule!r}" if result.pixels_cleaned else "",
        extra={"instance_id": instance_id, "study_key": study_key},
    )


def _record(
    s: Session,
    ctx: JobContext,
    result: DeidResult,
    instance_id: int,
    study_key: str,
    series_key: str,
    digest: str,
) -> None:
    now = datetime.now(UTC)
    db = ctx.db
    db.upsert(
        s,
        Study,
        {
            "study_key": study_key,
            "patient_key": result.patient_key,
            "accession_key": result.accession_key,
            "state": StudyState.RECEIVING.value,
            "version": 1,
            "first_received_at": now,
            "last_received_at": now,
        },
        key="study_key",
    )
    study = s.execute(
        select(Study).where(Study.study_key == study_key).with_for_update()
    ).scalar_one()
    if study.state == StudyState.COMPLETE.value:
        study.state = StudyState.RECEIVING.value
        study.version += 1
        study.completed_at = None
        logger.info("study %s re-opened at version %d", short_key(study_key), study.version,
                    extra={"study_key": study_key, "study_version": study.version})
    study.last_received_at = now
    if study.patient_key is None:
        study.patient_key = result.patient_key
    if study.accession_key is None and result.accession_key is not None:
        study.accession_key = result.accession_key

    db.upsert(
        s,
        Series,
        {
            "series_key": series_key,
            "study_key": study_key,
            "modality": (result.modality or None) and result.modality[:16],
            "body_part": (result.body_part or None) and result.body_part[:64],
            "view_position": (result.view_position or None) and result.view_position[:16],
        },
        key="series_key",
    )
    series = s.get(Series, series_key)
    if series is not None:
        series.modality = series.modality or (result.modality or "")[:16] or None
        series.body_part = series.body_part or (result.body_part or "")[:64] or None
        series.view_position = series.view_position or (result.view_position or "")[:16] or None

    db.upsert(
        s,
        DeidInstance,
        {
            "sop_key": result.sop_key,
            "study_key": study_key,
            "series_key": series_key,
            "sop_class_uid": result.sop_class_uid,
            "blob_digest": digest,
            "size_bytes": len(result.data),
            "created_at": now,
        },
        key="sop_key",
        update={"blob_digest": digest, "size_bytes": len(result.data)},
    )
    vault.store(
        db,
        s,
        ctx.keys,
        study_key=study_key,
        sop_key=result.sop_key,
        study_plaintext=result.vault_study,
        instance_plaintext=result.vault_instance,
    )
    s.execute(
        update(Instance)
        .where(Instance.id == instance_id)
        .values(
            state=InstanceState.DEIDENTIFIED.value,
            blob_digest=digest,
            reject_reason=None,
            updated_at=now,
        )
    )
    record(
        s,
        AuditKind.DEIDENTIFIED,
        sop_key=result.sop_key,
        study_key=study_key,
        series_key=series_key,
        blob=digest,
        methods=[c.value for c in result.options],
        pixel_rule=result.pixel_rule,
    )


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
