"""Study assembly: decide that a study is complete, then queue one ``infer`` job per task.

DICOM has no end-of-study signal, so the node does what DICOM routers do: a study is complete
when no instance of it arrived for ``[tasks] quiet_period_seconds`` (and none is still waiting
for de-identification). The worker processes run :func:`sweep` periodically (registered with
:func:`node.jobs.periodic`, every ``[tasks] sweep_seconds``); it is safe in several
processes at once because a study is completed by one conditional ``UPDATE`` (only the process
whose update changes the row queues the jobs, in the same transaction) and every job has a
dedupe key ``infer:<task>:<study_key>:v<version>``.

Re-opening: when an instance arrives for a complete study, de-identification sets the study
back to ``receiving`` and increments its ``version``. The next completion queues jobs for the
new version (new dedupe keys) and marks the results of older versions ``superseded``; an
``infer`` job of an older version finds the study at a newer version and does nothing (see
:func:`node.tasks.studies.prepare_task_input`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydicom.dataset import Dataset
from sqlalchemy import exists, func, select, update
from sqlalchemy.sql.expression import Exists

from node.jobs import InferPayload, JobContext, JobKind, enqueue, periodic
from node.logs import short_key
from node.tasks import load_tasks
from node.tasks.studies import StudyDataError, accepted_by, instances_of, read_header
from plugins.base import TaskPlugin
from storage.errors import StorageError
from storage.models import Instance, Result, Study
from storage.records import InstanceState, StudyState

logger = logging.getLogger(__name__)

BATCH = 200
"""Studies examined per sweep at most (the oldest quiet ones first)."""


def infer_dedupe_key(task: str, study_key: str, version: int) -> str:
    """The dedupe key of the ``infer`` job of *task* for one version of a study."""
    return f"infer:{task}:{study_key}:v{version}"


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    completed: int = 0
    """Studies marked complete."""
    infer_jobs: int = 0
    """``infer`` jobs queued."""
    waiting: int = 0
    """Quiet studies with instances still waiting for de-identification."""
    raced: int = 0
    """Studies that changed (or another process completed) while being examined."""


def _pending(study_key: str) -> Exists:
    return exists().where(
        Instance.study_key == study_key, Instance.state == InstanceState.RECEIVED.value
    )


def _complete_one(
    ctx: JobContext,
    tasks: Mapping[str, TaskPlugin],
    study_key: str,
    version: int,
    cutoff: datetime,
    now: datetime,
) -> tuple[str, int]:
    """Try to complete one study; return (outcome, jobs queued)."""
    with ctx.db.session() as session:
        if session.execute(select(_pending(study_key))).scalar():
            return "waiting", 0
        instances = instances_of(session, study_key)
    headers: dict[str, Dataset] = {}
    for inst in instances:
        try:
            headers[inst.sop_key] = read_header(ctx.blobs, inst.blob_ref)
        except (StorageError, StudyDataError) as exc:
            logger.warning(
                "study %s: instance %s not offered to tasks: %s",
                short_key(study_key), short_key(inst.sop_key), exc,
                extra={"study_key": study_key, "sop_key": inst.sop_key},
            )
    selected = accepted_by(tasks, headers)
    queued = 0
    with ctx.db.session() as session:
        changed = session.execute(
            update(Study)
            .where(
                Study.study_key == study_key,
                Study.state == StudyState.RECEIVING.value,
                Study.version == version,
                Study.last_received_at <= cutoff,
                ~_pending(study_key),
            )
            .values(state=StudyState.COMPLETE.value, completed_at=now)
        ).rowcount  # type: ignore[attr-defined]
        if changed != 1:
            return "raced", 0
        count = session.execute(
            select(func.count()).select_from(Instance).where(Instance.study_key == study_key)
        ).scalar_one()
        session.execute(
            update(Result)
            .where(
                Result.study_key == study_key,
                Result.study_version < version,
                Result.superseded.is_(False),
            )
            .values(superseded=True)
        )
        for name, sop_keys in selected.items():
            job_id = enqueue(
                ctx.queue,
                InferPayload(
                    study_key=study_key,
                    study_version=version,
                    task=name,
                    task_version=tasks[name].version,
                    sop_keys=tuple(sop_keys),
                ),
                dedupe_key=infer_dedupe_key(name, study_key, version),
                session=session,
            )
            queued += job_id is not None
    logger.info(
        "study %s version %d complete (%d of %d instances de-identified); infer queued for: %s",
        short_key(study_key),
        version,
        len(instances),
        count,
        ", ".join(selected) or "no task",
        extra={"study_key": study_key, "study_version": version},
    )
    return "completed", queued


def sweep(
    ctx: JobContext,
    tasks: Mapping[str, TaskPlugin] | None = None,
    *,
    now: datetime | None = None,
    limit: int = BATCH,
) -> SweepReport:
    """Complete every study that has been quiet for the quiet period; queue its ``infer`` jobs.

    Parameters
    ----------
    ctx : JobContext
        Database, queue and blob store of this process.
    tasks : mapping of str to TaskPlugin, optional
        The enabled tasks (default: :func:`node.tasks.load_tasks` of ``ctx.settings``).
    now : datetime, optional
        The current time (UTC); tests pass it to move time forward.
    limit : int
        At most this many studies are examined, the longest-quiet first.
    """
    if tasks is None:
        tasks = load_tasks(ctx.settings)
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(seconds=ctx.settings.tasks.quiet_period_seconds)
    with ctx.db.read() as session:  # a read: no turn of SQLite's write lock
        candidates = session.execute(
            select(Study.study_key, Study.version)
            .where(Study.state == StudyState.RECEIVING.value, Study.last_received_at <= cutoff)
            .order_by(Study.last_received_at)
            .limit(limit)
        ).all()
    counts = {"completed": 0, "waiting": 0, "raced": 0}
    jobs = 0
    for study_key, version in candidates:
        outcome, queued = _complete_one(ctx, tasks, study_key, version, cutoff, now)
        counts[outcome] += 1
        jobs += queued
    report = SweepReport(infer_jobs=jobs, **counts)
    if candidates:
        logger.debug("assembly sweep: %s", report)
    return report


@periodic("assemble", lambda settings: settings.tasks.sweep_seconds, kind=JobKind.ASSEMBLE)
def assemble_periodic(ctx: JobContext) -> None:
    """The worker's periodic hook: :func:`sweep` every ``[tasks] sweep_seconds``."""
    sweep(ctx)
