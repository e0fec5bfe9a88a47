"""Where each study is in the mission, by pseudonym (``fednode status``).

The steps, in order: ``received`` (instances in the spool), ``de-identified`` (a de-identified
copy exists), ``assembled`` (the study is complete), ``inferred`` (a result of the current
version), ``reported`` (its SR is in the outbox) and ``exported`` (every destination
acknowledged the SR). A failure shows where it stopped: ``rejected`` (no instance admitted, or
de-identification failed), ``inference failed`` (the study's ``infer`` job of the current
version is dead-lettered) and ``export failed`` (a delivery is dead-lettered).
Each step's time is the moment it was reached, so the gaps are the steps' durations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from storage.db import Database
from storage.models import (
    DeidInstance,
    Instance,
    JobRow,
    Report,
    ReportExport,
    Result,
    Study,
)
from storage.records import ExportState, InstanceState, JobState, ReportState

STEPS = ("received", "de-identified", "assembled", "inferred", "reported", "exported")


@dataclass(frozen=True)
class StudyProgress:
    study_key: str
    version: int
    step: str
    instances: int
    times: dict[str, datetime | None] = field(default_factory=dict)
    """When each of :data:`STEPS` was reached (``None``: not yet)."""


def study_progress(db: Database, *, limit: int = 20) -> list[StudyProgress]:
    """The *limit* most recently received studies and the step each has reached."""
    with db.session() as session:
        received = session.execute(
            select(Instance.study_key, func.min(Instance.received_at), func.count())
            .group_by(Instance.study_key)
            .order_by(func.max(Instance.received_at).desc())
            .limit(limit)
        ).all()
        keys = [row[0] for row in received]
        studies = {
            s.study_key: s
            for s in session.execute(select(Study).where(Study.study_key.in_(keys))).scalars()
        }
        deid: dict[str, datetime] = {
            key: at
            for key, at in session.execute(
                select(DeidInstance.study_key, func.max(DeidInstance.created_at))
                .where(DeidInstance.study_key.in_(keys))
                .group_by(DeidInstance.study_key)
            )
        }
        results: dict[tuple[str, int], datetime] = {}
        for key, version, at in session.execute(
            select(Result.study_key, Result.study_version, func.max(Result.created_at))
            .where(Result.study_key.in_(keys))
            .group_by(Result.study_key, Result.study_version)
        ):
            results[(key, version)] = at
        reports: dict[tuple[str, int], tuple[datetime, datetime | None, bool]] = {}
        for report in session.execute(
            select(Report).where(
                Report.study_key.in_(keys), Report.state != ReportState.SUPERSEDED.value
            )
        ).scalars():
            dead = session.execute(
                select(func.count())
                .select_from(ReportExport)
                .where(
                    ReportExport.report_id == report.id,
                    ReportExport.state == ExportState.DEAD.value,
                )
            ).scalar_one()
            reports[(report.study_key, report.study_version)] = (
                report.created_at,
                report.exported_at if report.state == ReportState.EXPORTED.value else None,
                dead > 0,
            )
        refused = {
            key
            for key, n in session.execute(
                select(Instance.study_key, func.count())
                .where(
                    Instance.study_key.in_(keys),
                    Instance.state.in_(
                        [InstanceState.REJECTED.value, InstanceState.FAILED.value]
                    ),
                )
                .group_by(Instance.study_key)
            )
            if n
        }
        infer_dead = set()
        for key in keys:
            version = studies[key].version if key in studies else 1
            dead = session.execute(
                select(func.count())
                .select_from(JobRow)
                .where(
                    JobRow.state == JobState.DEAD.value,
                    JobRow.dedupe_key.like(f"infer:%:{key}:v{version}"),
                )
            ).scalar_one()
            if dead:
                infer_dead.add(key)
    out = []
    for key, first, count in received:
        study = studies.get(key)
        version = study.version if study else 1
        built = reports.get((key, version))
        times: dict[str, datetime | None] = {
            "received": first,
            "de-identified": deid.get(key),
            "assembled": study.completed_at if study else None,
            "inferred": results.get((key, version)),
            "reported": built[0] if built else None,
            "exported": built[1] if built else None,
        }
        step = "received"
        for name in STEPS:
            if times[name] is not None:
                step = name
        if built and built[2] and times["exported"] is None:
            step = "export failed"
        elif step == "received" and key in refused:
            step = "rejected"
        elif step == "assembled" and key in infer_dead:
            step = "inference failed"
        out.append(StudyProgress(key, version, step, int(count), times))
    return out
