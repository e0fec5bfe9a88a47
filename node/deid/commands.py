"""``fednode deid``: de-identify DICOM files offline with the node's profile and keys.

The output of a file is byte for byte what the ``deidentify`` job stores for the same instance
(same engine, same configuration, same site key), written as
``OUT/<study key>/<series key>/<instance key>.dcm`` (keyed pseudonyms: no PHI in the paths).
Instances the burned-in gate does not admit are listed with their reasons. With
``--write-maps`` the command also writes ``uid_map.csv`` and ``patient_map.csv`` (original ->
pseudonym): **these files hold PHI** and are written readable by the owner only.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from node.cli_common import console
from node.config import load_settings
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


@dataclass
class Summary:
    """What one run did (counts, and the reasons of rejections and failures)."""

    done: int = 0
    skipped: int = 0
    rejected: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


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
    task = progress.add_task("de-identifying", total=len(files)) if progress else None
    for path in files:
        try:
            try:
                data = path.read_bytes()
            except OSError as exc:
                summary.failed.append((path, f"cannot read: {exc.strerror}"))
                continue
            if not is_dicom(data[:132]):
                summary.skipped += 1
                continue
            try:
                result = engine.deidentify_file(data)
            except RejectedInstance as exc:
                summary.rejected.append((path, str(exc)))
                continue
            except DeidError as exc:
                summary.failed.append((path, str(exc)))
                continue
            if result.residue:
                summary.failed.append(
                    (path, "residue check failed: " + ", ".join(result.residue))
                )
                continue
            _write(output_path(out, result), result.data)
            summary.done += 1
            if maps is not None:
                maps[0].update(result.uid_map)
                maps[1].add(result.patient_map)
        finally:
            if progress is not None and task is not None:
                progress.advance(task)
    return summary


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
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="config file (default ./fednode.toml)"),
    ] = None,
) -> None:
    """De-identify DICOM files offline (PS3.15 Annex E) with the node's profile and keys."""
    for item in inputs:
        if not item.exists():
            raise typer.BadParameter(f"{item} does not exist", param_hint="INPUT")
    settings = load_settings(config)
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
    _report(summary, out, with_maps)
    if summary.failed:
        raise typer.Exit(int(ExitCode.DEID))


def _report(summary: Summary, out: Path, with_maps: bool) -> None:
    table = Table(title="fednode deid", show_header=False)
    table.add_row("de-identified", str(summary.done))
    table.add_row("rejected", str(len(summary.rejected)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("skipped (not DICOM)", str(summary.skipped))
    table.add_row("output", str(out))
    console.print(table)
    if summary.rejected:
        reasons = Counter(reason for _, reason in summary.rejected)
        rej = Table(title="rejected (not admitted)")
        rej.add_column("files", justify="right")
        rej.add_column("reason")
        for reason, count in reasons.most_common():
            rej.add_row(str(count), reason)
        console.print(rej)
    for path, reason in summary.failed:
        console.print(f"[red]failed[/] {path}: {reason}")
    if with_maps:
        console.print(
            "[yellow]uid_map.csv and patient_map.csv hold PHI (original identifiers): "
            "keep them as protected as the originals.[/]"
        )


def register(app: typer.Typer) -> None:
    """Add ``fednode deid`` to *app*."""
    app.command("deid")(deid)
