"""``fednode deid``: de-identify DICOM files offline with the node's profile and keys.

The output of a file is byte for byte what the ``deidentify`` job stores for the same instance
(same engine, same configuration, same site key), written as
``OUT/<study key>/<series key>/<instance key>.dcm`` (keyed pseudonyms: no PHI in the paths).
Every input gets an outcome (:class:`Outcome`): rejections are summarised by reason, ``-v``
names each file with its outcome, ``--report FILE`` writes them all (CSV, or JSON for
``.json``). Two inputs with one SOP Instance UID never overwrite each other's output: an
identical copy is a ``duplicate``, a different one a ``collision`` (not written, exit 9). With
``--write-maps`` the command also writes ``uid_map.csv`` and ``patient_map.csv`` (original ->
pseudonym): **these files hold PHI** and are written readable by the owner only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from node.cli_common import ConfigOpt, VerboseOpt, console, plain
from node.config import load_settings, require_config
from node.deid.engine import Deidentifier, DeidResult
from node.errors import DeidError, ExitCode, RejectedInstance
from node.keys import load_keys

logger = logging.getLogger(__name__)


def is_dicom(head: bytes) -> bool:
    """Whether *head* (the first 132+ bytes of a file) looks like DICOM (PS3.10 7.1)."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    return group_le in (0x0002, 0x0008) or group_be == 0x0008


def iter_files(inputs: list[Path], skip: Path | None = None) -> Iterator[Path]:
    """Every regular file under *inputs* (folders recursively, sorted), except under *skip*."""
    skip_resolved = skip.resolve() if skip is not None else None
    for item in inputs:
        if item.is_dir():
            for root, dirs, files in os.walk(item):
                here = Path(root)
                if skip_resolved is not None and here.resolve().is_relative_to(skip_resolved):
                    dirs[:] = []
                    continue
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield here / name
        elif item.is_file():
            yield item


class Outcome(StrEnum):
    """What became of one input file."""

    DEIDENTIFIED = "deidentified"
    REJECTED = "rejected"
    """Not admitted (burned-in text and no pixel rule, pixel data that does not decode ...)."""
    FAILED = "failed"
    """Could not be read or de-identified, or the output failed the residue check."""
    SKIPPED = "skipped"
    """Not a DICOM file."""
    COLLISION = "collision"
    """Shares its SOP Instance UID with an earlier input of the run but differs from it: not
    written (it would overwrite that output)."""
    DUPLICATE = "duplicate"
    """The same instance as an earlier input of the run (same SOP Instance UID, same output)."""


@dataclass(frozen=True)
class FileResult:
    """One input file's outcome (for the summary, ``-v`` and ``--report``)."""

    path: Path
    outcome: Outcome
    reason: str = ""
    output: Path | None = None


@dataclass
class Summary:
    """What one run did, file by file."""

    results: list[FileResult] = field(default_factory=list)

    def of(self, outcome: Outcome) -> list[FileResult]:
        return [r for r in self.results if r.outcome is outcome]

    @property
    def done(self) -> int:
        return len(self.of(Outcome.DEIDENTIFIED))

    @property
    def skipped(self) -> int:
        return len(self.of(Outcome.SKIPPED))

    @property
    def rejected(self) -> list[tuple[Path, str]]:
        return [(r.path, r.reason) for r in self.of(Outcome.REJECTED)]

    @property
    def failed(self) -> list[tuple[Path, str]]:
        return [(r.path, r.reason) for r in self.of(Outcome.FAILED)]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def output_path(out: Path, result: DeidResult) -> Path:
    """Where the de-identified file of *result* goes under *out* (pseudonymous keys only)."""
    return out / result.study_key / result.series_key / f"{result.sop_key}.dcm"


def run(
    engine: Deidentifier,
    files: list[Path],
    out: Path,
    *,
    maps: tuple[dict[str, str], set[tuple[str, str, str, str]]] | None = None,
    progress: Progress | None = None,
) -> Summary:
    """De-identify *files* into *out*; collect the maps into *maps* when given."""
    summary = Summary()
    written: dict[Path, tuple[Path, str]] = {}  # output -> (input, digest of the output)
    task = progress.add_task("de-identifying", total=len(files)) if progress else None
    for path in files:
        try:
            summary.results.append(_one(engine, path, out, written, maps))
        finally:
            if progress is not None and task is not None:
                progress.advance(task)
    return summary


def _one(
    engine: Deidentifier,
    path: Path,
    out: Path,
    written: dict[Path, tuple[Path, str]],
    maps: tuple[dict[str, str], set[tuple[str, str, str, str]]] | None,
) -> FileResult:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FileResult(path, Outcome.FAILED, f"cannot read: {exc.strerror}")
    if not is_dicom(data[:132]):
        return FileResult(path, Outcome.SKIPPED, "not a DICOM file (no DICM prefix or dataset)")
    try:
        result = engine.deidentify_file(data)
    except RejectedInstance as exc:
        return FileResult(path, Outcome.REJECTED, str(exc))
    except DeidError as exc:
        return FileResult(path, Outcome.FAILED, str(exc))
    if result.residue:
        return FileResult(
            path, Outcome.FAILED, "residue check failed: " + ", ".join(result.residue)
        )
    target = output_path(out, result)
    digest = hashlib.sha256(result.data).hexdigest()
    earlier = written.get(target)
    if earlier is not None:
        first, first_digest = earlier
        if first_digest == digest:
            return FileResult(
                path, Outcome.DUPLICATE, f"the same instance as {first} (same output)", target
            )
        return FileResult(
            path,
            Outcome.COLLISION,
            f"its SOP Instance UID is also that of {first}, whose output it would overwrite; "
            "not written",
        )
    _write(target, result.data)
    written[target] = (path, digest)
    if maps is not None:
        maps[0].update(result.uid_map)
        maps[1].add(result.patient_map)
    return FileResult(path, Outcome.DEIDENTIFIED, output=target)


REPORT_FIELDS = ("input", "outcome", "reason", "output")


def write_report(path: Path, summary: Summary) -> None:
    """Write the per-file report: JSON when *path* ends in ``.json``, else CSV.

    Input paths are the operator's own file names (the report stays with the originals);
    outputs are pseudonymous paths.
    """
    rows = [
        {
            "input": str(r.path),
            "outcome": r.outcome.value,
            "reason": r.reason,
            "output": str(r.output) if r.output is not None else "",
        }
        for r in summary.results
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def write_maps(out: Path, uids: dict[str, str], patients: set[tuple[str, str, str, str]]) -> None:
    """Write ``uid_map.csv`` and ``patient_map.csv`` (PHI!) with mode 0600."""
    for name, header, rows in (
        ("uid_map.csv", ["old", "new"], sorted(uids.items())),
        ("patient_map.csv", ["old", "new", "old_name", "new_name"],
         sorted((p[0], p[2], p[1], p[3]) for p in patients)),
    ):
        path = out / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
        os.chmod(path, 0o600)


def deid(
    inputs: Annotated[
        list[Path], typer.Argument(help="DICOM files or folders (searched recursively)")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the de-identified files")],
    with_maps: Annotated[
        bool,
        typer.Option(
            "--write-maps",
            help="also write uid_map.csv and patient_map.csv (original -> pseudonym: PHI!)",
        ),
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="write every input's outcome to this file: JSON if it ends in .json, else CSV "
            "(input, outcome, reason, output)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
    config: ConfigOpt = None,
) -> None:
    """De-identify DICOM files offline (PS3.15 Annex E) with the node's profile and keys."""
    for item in inputs:
        if not item.exists():
            raise typer.BadParameter(f"{item} does not exist", param_hint="INPUT")
    resolved_out = out.resolve()
    for item in inputs:
        folder = item.resolve()
        if item.is_dir() and resolved_out.is_relative_to(folder):
            raise typer.BadParameter(
                f"the output folder {out} is inside the input folder {item}: its outputs would "
                "be read as inputs; choose an output folder outside it",
                param_hint="--out",
            )
        if resolved_out == folder or folder.is_relative_to(resolved_out):
            raise typer.BadParameter(
                f"the input {item} is inside the output folder {out}; choose another --out",
                param_hint="--out",
            )
    settings = load_settings(require_config(config))
    keys = load_keys(settings.secret_path)
    engine = Deidentifier(settings.deid, keys.site)
    out.mkdir(parents=True, exist_ok=True)
    files = list(iter_files(inputs, skip=out))
    maps: tuple[dict[str, str], set[tuple[str, str, str, str]]] | None = (
        ({}, set()) if with_maps else None
    )
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        summary = run(engine, files, out, maps=maps, progress=progress)
    if maps is not None:
        write_maps(out, *maps)
    if report is not None:
        write_report(report, summary)
    _report(summary, out, with_maps, verbose=verbose, report=report)
    if summary.failed or summary.of(Outcome.COLLISION):
        raise typer.Exit(int(ExitCode.DEID))


def _report(
    summary: Summary, out: Path, with_maps: bool, *, verbose: bool, report: Path | None
) -> None:
    table = Table(title="fednode deid", show_header=False)
    table.add_row("de-identified", str(summary.done))
    table.add_row("rejected", str(len(summary.rejected)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("skipped (not DICOM)", str(summary.skipped))
    collisions = summary.of(Outcome.COLLISION)
    duplicates = summary.of(Outcome.DUPLICATE)
    if collisions:
        table.add_row("not written (SOP Instance UID collision)", str(len(collisions)))
    if duplicates:
        table.add_row("duplicates (same instance again)", str(len(duplicates)))
    table.add_row("output", plain(out))
    if report is not None:
        table.add_row("report", plain(report))
    console.print(table)
    if summary.rejected and not verbose:
        reasons = Counter(reason for _, reason in summary.rejected)
        rej = Table(title="rejected (not admitted)")
        rej.add_column("files", justify="right")
        rej.add_column("reason")
        for reason, count in reasons.most_common():
            rej.add_row(str(count), plain(reason))
        console.print(rej)
    for r in summary.results:
        if r.outcome in (Outcome.FAILED, Outcome.COLLISION):
            console.print(f"[red]{r.outcome.value}[/] {plain(r.path)}: {plain(r.reason)}")
        elif verbose and r.outcome is not Outcome.DEIDENTIFIED:
            console.print(f"[yellow]{r.outcome.value}[/] {plain(r.path)}: {plain(r.reason)}")
        elif verbose:
            console.print(f"[green]{r.outcome.value}[/] {plain(r.path)} -> {plain(r.output)}")
    if (summary.rejected or summary.skipped) and not verbose and report is None:
        console.print("name the rejected and skipped files with -v, or write them with --report")
    if with_maps:
        console.print(
            "[yellow]uid_map.csv and patient_map.csv hold PHI (original identifiers): "
            "keep them as protected as the originals.[/]"
        )


def register(app: typer.Typer) -> None:
    """Add ``fednode deid`` to *app*."""
    app.command("deid")(deid)
