"""Training labels: import from a CSV file keyed by original identifiers, stored by pseudonym.

The file names each study by its original Study Instance UID or Accession Number (what a
hospital's reporting system exports) and gives one label per task column::

    study_instance_uid,accession_number,chest_xray
    1.2.840.113619.2.55.3.1,ACC001,pneumonia
    ,ACC002,no_pneumonia

Keys are mapped with the site key exactly as de-identification maps them (``uid_pseudonym``
for the study UID, ``token(site_key, "accession", …)`` for the accession number); the
``labels`` table holds only the study's pseudonymous key, the task and the class name. The
import is all-or-nothing: any bad row, or any key that matches no stored study, and nothing is
written. Reports name lines and columns, never the identifiers in them.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import case, exists, func, select

from node.deid.pseudonyms import token, uid_pseudonym
from node.errors import NodeError
from plugins.base import TaskPlugin
from storage.audit import AuditKind, record
from storage.db import Database
from storage.models import DeidInstance, Label, Study

logger = logging.getLogger(__name__)

UID_COLUMN = "study_instance_uid"
ACCESSION_COLUMN = "accession_number"
KEY_COLUMNS = (UID_COLUMN, ACCESSION_COLUMN)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class LabelFileError(NodeError):
    """The label file cannot be read or its header is wrong."""


@dataclass(frozen=True)
class Problem:
    """A row that cannot be imported: its line in the file and why (no identifiers)."""

    line: int
    reason: str


@dataclass
class ImportReport:
    """What an import found and did."""

    rows: int = 0
    """Data rows read."""
    labels: int = 0
    """(study, task) labels in the file after merging exact duplicates."""
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    per_task: dict[str, dict[str, int]] = field(default_factory=dict)
    """Labels in the file by task and class."""
    unknown: list[Problem] = field(default_factory=list)
    """Rows whose key matches no study in storage."""
    bad: list[Problem] = field(default_factory=list)
    """Rows that are malformed or contradict another row."""
    imported: bool = False
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.bad and not self.unknown


@dataclass(frozen=True)
class LabelCount:
    """Labels of one task and class, and how many of those studies have stored images."""

    task: str
    label: str
    studies: int
    with_images: int


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise LabelFileError(f"label file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(
            f"cannot read label file {path} as UTF-8 text: {type(exc).__name__}"
        ) from exc
    first = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t"), key=first.count)
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise LabelFileError(f"label file {path} is empty") from None
    columns = [c.strip().lower() for c in header]
    rows: list[tuple[int, dict[str, str]]] = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        line = reader.line_num
        if len(values) != len(columns):
            rows.append((line, {"__width__": str(len(values))}))
            continue
        rows.append((line, {c: v.strip() for c, v in zip(columns, values, strict=True)}))
    return columns, rows


def _check_header(columns: list[str], tasks: Mapping[str, TaskPlugin]) -> list[str]:
    if len(set(columns)) != len(columns):
        raise LabelFileError("the label file repeats a column name")
    if not set(columns) & set(KEY_COLUMNS):
        raise LabelFileError(f"the label file needs a {UID_COLUMN} or {ACCESSION_COLUMN} column")
    task_columns = [c for c in columns if c not in KEY_COLUMNS]
    unknown = [c for c in task_columns if c not in tasks]
    if unknown:
        shown = ", ".join(repr(c[:32]) for c in unknown)
        enabled = ", ".join(tasks) or "none"
        raise LabelFileError(
            f"column(s) {shown} name no enabled task (enabled: {enabled}); "
            "rename the column or enable the task in [tasks] enabled"
        )
    if not task_columns:
        raise LabelFileError("the label file has no task column (one column per task)")
    return task_columns


def import_labels(
    db: Database,
    site_key: bytes,
    tasks: Mapping[str, TaskPlugin],
    path: Path,
    *,
    dry_run: bool = False,
    skip_unknown: bool = False,
) -> ImportReport:
    """Import the labels of *path* for *tasks*, all or nothing.

    Parameters
    ----------
    db : Database
        The node's database.
    site_key : bytes
        The node's pseudonym key (:attr:`node.keys.NodeKeys.site`).
    tasks : mapping of str to TaskPlugin
        The enabled tasks; every column but the key columns must name one.
    path : Path
        The CSV file (comma, semicolon or tab separated; UTF-8, with or without BOM).
    dry_run : bool
        Check everything, write nothing.
    skip_unknown : bool
        Import the other rows when some keys match no stored study (they are reported);
        without it such keys fail the import like bad rows.

    Returns
    -------
    ImportReport
        ``imported`` is true only if the labels were written.

    Raises
    ------
    LabelFileError
        If the file cannot be read or its header is wrong.
    """
    columns, rows = _read_rows(path)
    task_columns = _check_header(columns, tasks)
    report = ImportReport(rows=len(rows), dry_run=dry_run)
    wanted: dict[tuple[str, str], tuple[str, int]] = {}  # (study_key, task) -> (label, line)
    with db.session() as session:
        for line, row in rows:
            if "__width__" in row:
                report.bad.append(
                    Problem(line, f"{row['__width__']} fields, the header has {len(columns)}")
                )
                continue
            uid = row.get(UID_COLUMN, "")
            accession = row.get(ACCESSION_COLUMN, "")
            labels: dict[str, str] = {}
            problems: list[str] = []
            for column in task_columns:
                value = row[column]
                if not value:
                    continue
                try:
                    labels[column] = tasks[column].parse_label(value)
                except ValueError as exc:
                    problems.append(f"column {column}: {exc}")
            if not uid and not accession:
                problems.append(f"neither {UID_COLUMN} nor {ACCESSION_COLUMN} is given")
            if uid and (len(uid) > 64 or not _UID_RE.match(uid)):
                problems.append(f"{UID_COLUMN} is not a valid UID")
            if not labels and not problems:
                problems.append("no label in any task column")
            if problems:
                report.bad.append(Problem(line, "; ".join(problems)))
                continue
            by_accession: list[str] = []
            if accession:
                by_accession = list(
                    session.execute(
                        select(Study.study_key).where(
                            Study.accession_key == token(site_key, "accession", accession)
                        )
                    ).scalars()
                )
            if uid:
                study_key = uid_pseudonym(site_key, uid)
                if session.get(Study, study_key) is None:
                    report.unknown.append(Problem(line, f"{UID_COLUMN} matches no stored study"))
                    continue
                if accession and study_key not in by_accession:
                    report.bad.append(
                        Problem(line, f"{UID_COLUMN} and {ACCESSION_COLUMN} name different studies")
                    )
                    continue
            elif not by_accession:
                report.unknown.append(Problem(line, f"{ACCESSION_COLUMN} matches no stored study"))
                continue
            elif len(by_accession) > 1:
                report.bad.append(
                    Problem(
                        line,
                        f"{ACCESSION_COLUMN} matches {len(by_accession)} studies; "
                        f"name the study by {UID_COLUMN}",
                    )
                )
                continue
            else:
                study_key = by_accession[0]
            for task, label in labels.items():
                seen = wanted.get((study_key, task))
                if seen is not None and seen[0] != label:
                    report.bad.append(
                        Problem(line, f"column {task}: contradicts line {seen[1]} (same study)")
                    )
                    continue
                if seen is None:
                    wanted[(study_key, task)] = (label, line)
        report.labels = len(wanted)
        for (_, task), (label, _) in wanted.items():
            counts = report.per_task.setdefault(task, {})
            counts[label] = counts.get(label, 0) + 1
        if report.bad or (report.unknown and not skip_unknown) or dry_run:
            logger.info(
                "labels not imported: %d bad row(s), %d unknown key(s), dry run %s",
                len(report.bad),
                len(report.unknown),
                dry_run,
            )
            session.rollback()
            return report
        existing = {
            (row.study_key, row.task): row
            for row in session.execute(
                select(Label).where(Label.study_key.in_({k for k, _ in wanted}))
            ).scalars()
        }
        for (study_key, task), (label, _) in wanted.items():
            current = existing.get((study_key, task))
            if current is None:
                session.add(Label(study_key=study_key, task=task, label=label))
                report.inserted += 1
            elif current.label != label:
                current.label = label
                report.updated += 1
            else:
                report.unchanged += 1
        record(
            session,
            AuditKind.LABELS_IMPORTED,
            actor="cli",
            rows=report.rows,
            inserted=report.inserted,
            updated=report.updated,
            unchanged=report.unchanged,
            skipped_unknown=len(report.unknown),
            tasks=sorted(report.per_task),
        )
        report.imported = True
    logger.info(
        "labels imported: %d inserted, %d updated, %d unchanged",
        report.inserted,
        report.updated,
        report.unchanged,
    )
    return report


def label_counts(db: Database, tasks: Mapping[str, TaskPlugin] | None = None) -> list[LabelCount]:
    """Labels per task and class, with how many of those studies have de-identified images.

    Classes of *tasks* without labels are listed with zero counts.
    """
    has_images = exists().where(DeidInstance.study_key == Label.study_key)
    query = (
        select(
            Label.task,
            Label.label,
            func.count(),
            func.sum(case((has_images, 1), else_=0)),
        )
        .group_by(Label.task, Label.label)
        .order_by(Label.task, Label.label)
    )
    with db.session() as session:
        found = {
            (task, label): LabelCount(task, label, int(n), int(imgs or 0))
            for task, label, n, imgs in session.execute(query)
        }
    for name, plugin in (tasks or {}).items():
        for cls in plugin.classes:
            found.setdefault((name, cls.name), LabelCount(name, cls.name, 0, 0))
    return sorted(found.values(), key=lambda c: (c.task, c.label))
