"""CLI commands of the tasks: ``fednode labels import|list``, ``fednode train --local`` and
``fednode synth``. :func:`register` adds them to the ``fednode`` app.

Errors are raised as :class:`~node.errors.NodeError` subclasses; ``node.cli.main`` prints them
and exits with their code. Progress bars go to stderr so that ``--json`` output on stdout stays
machine-readable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from node.cli_common import ConfigOpt, JsonOpt, console, err
from node.config import load_settings
from node.errors import ExitCode, NodeError, PluginError

if TYPE_CHECKING:
    from node.tasks.labels import ImportReport
    from node.tasks.training import TrainResult

logger = logging.getLogger(__name__)


labels_app = typer.Typer(
    help="Training labels: import from CSV (keyed by original Study UID or Accession Number, "
    "stored by pseudonym) and list.",
    no_args_is_help=True,
)

MAX_PROBLEMS_SHOWN = 50


class LabelsNotImported(NodeError):
    """The label file was not imported (see the rows reported above)."""


class UsageError(NodeError):
    """The command was called with options that do not go together."""

    exit_code = ExitCode.USAGE


def register(app: typer.Typer) -> None:
    """Add ``labels``, ``train`` and ``synth`` to the ``fednode`` *app*."""
    app.add_typer(labels_app, name="labels")
    app.command("train")(train)
    app.command("synth")(synth)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# labels


def _import_json(report: ImportReport) -> dict[str, Any]:
    return {
        "imported": report.imported,
        "dry_run": report.dry_run,
        "rows": report.rows,
        "labels": report.labels,
        "inserted": report.inserted,
        "updated": report.updated,
        "unchanged": report.unchanged,
        "per_task": report.per_task,
        "unknown": [{"line": p.line, "reason": p.reason} for p in report.unknown],
        "bad": [{"line": p.line, "reason": p.reason} for p in report.bad],
    }


@labels_app.command("import")
def labels_import(
    file: Annotated[
        Path,
        typer.Argument(
            help="CSV file: study_instance_uid and/or accession_number, then one column per task"
        ),
    ],
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="check only, write nothing")] = False,
    skip_unknown: Annotated[
        bool,
        typer.Option(
            "--skip-unknown",
            help="import the other rows when some keys match no "
            "stored study (default: import nothing)",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import labels, all or nothing; keys are mapped to pseudonyms, no identifier is stored."""
    from node.runtime import open_context
    from node.tasks import load_tasks
    from node.tasks.labels import import_labels

    settings = load_settings(config)
    ctx = open_context(settings)
    report = import_labels(
        ctx.db,
        ctx.keys.site,
        load_tasks(settings),
        file,
        dry_run=dry_run,
        skip_unknown=skip_unknown,
    )
    if as_json:
        print(json.dumps(_import_json(report), indent=2, sort_keys=True))
    else:
        table = Table(title="labels in the file")
        for column in ("task", "class", "studies"):
            table.add_column(column, justify="right" if column == "studies" else "left")
        for task, counts in sorted(report.per_task.items()):
            for label, n in sorted(counts.items()):
                table.add_row(task, label, str(n))
        console.print(table)
        problems = [("bad row", p) for p in report.bad] + [
            ("unknown key", p) for p in report.unknown
        ]
        for kind, problem in sorted(problems, key=lambda kp: kp[1].line)[:MAX_PROBLEMS_SHOWN]:
            colour = "red" if kind == "bad row" or not skip_unknown else "yellow"
            console.print(f"[{colour}]line {problem.line}[/]: {kind}: {problem.reason}")
        if len(problems) > MAX_PROBLEMS_SHOWN:
            console.print(f"… and {len(problems) - MAX_PROBLEMS_SHOWN} more")
        if report.imported:
            console.print(
                f"[green]imported[/] {report.rows} rows: {report.inserted} new, "
                f"{report.updated} changed, {report.unchanged} unchanged labels"
                + (f"; {len(report.unknown)} unknown keys skipped" if report.unknown else "")
            )
        elif report.dry_run and report.ok:
            console.print(f"[green]dry run: {report.labels} labels would be imported[/]")
        else:
            console.print(
                f"[red]nothing imported[/]: {len(report.bad)} bad row(s), "
                f"{len(report.unknown)} unknown key(s)"
                + ("" if report.bad or skip_unknown else " (use --skip-unknown to import the rest)")
            )
    if report.bad or (report.unknown and not skip_unknown):
        raise LabelsNotImported(
            f"labels not imported: {len(report.bad)} bad row(s), "
            f"{len(report.unknown)} unknown key(s)"
        )


@labels_app.command("list")
def labels_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Labels per task and class, and how many of those studies have de-identified images."""
    from node.runtime import open_context
    from node.tasks import load_tasks
    from node.tasks.labels import label_counts

    settings = load_settings(config)
    ctx = open_context(settings)
    counts = label_counts(ctx.db, load_tasks(settings))
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "task": c.task,
                        "class": c.label,
                        "studies": c.studies,
                        "with_images": c.with_images,
                    }
                    for c in counts
                ],
                indent=2,
            )
        )
        return
    table = Table(title="labels")
    table.add_column("task")
    table.add_column("class")
    table.add_column("studies", justify="right")
    table.add_column("with images", justify="right")
    for c in counts:
        table.add_row(c.task, c.label, str(c.studies), str(c.with_images))
    console.print(table)


# ---------------------------------------------------------------------------------------------
# train


def _train_json(result: TrainResult) -> dict[str, Any]:
    return {
        "task": result.task,
        "task_version": result.task_version,
        "model_id": result.model_id,
        "architecture_hash": result.architecture_hash,
        "artifact": str(result.artifact),
        "n_train": result.n_train,
        "n_holdout": result.n_holdout,
        "max_abs_logit": result.max_abs_logit,
        "holdout": result.holdout.as_dict(),
        "train": result.train.as_dict(),
        "skipped": len(result.skipped),
    }


def train(
    task: Annotated[str, typer.Option("--task", help="name of an enabled task")],
    local: Annotated[
        bool, typer.Option("--local", help="train on this node's labelled studies only")
    ] = False,
    epochs: Annotated[int, typer.Option(min=1, help="passes over the training part")] = 40,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    holdout: Annotated[
        float, typer.Option(min=0.05, max=0.9, help="fraction held out for the metrics")
    ] = 0.25,
    seed: Annotated[int, typer.Option(help="seed of the split and the training")] = 0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a task's model; print AUC, accuracy, sensitivity, specificity and MCC on a
    seeded held-out split; save the model artifact in [tasks] models_dir."""
    if not local:
        raise UsageError(
            "pass --local to train on this node's labelled data alone; federated training "
            "is not started with `train`: enrol the node (`fednode federation enroll`), approve "
            "the coordinator's app (`fednode federation approve`) and run the SuperNode "
            "(`fednode federation join`); see `fednode federation --help`"
        )
    from node.runtime import open_context
    from node.tasks import get_task
    from node.tasks.training import TrainOptions, train_local

    settings = load_settings(config)
    ctx = open_context(settings)
    plugin = get_task(settings, task)
    options = TrainOptions(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        holdout=holdout,
        seed=seed,
    )
    with _progress() as bar:
        ids: dict[str, TaskID] = {}
        labels = {
            "reading": "reading studies",
            "preprocessing": "preprocessing",
            "training": f"training {plugin.name}",
        }

        def progress(phase: str, done: int, total: int) -> None:
            if as_json:
                return
            if phase not in ids:
                ids[phase] = bar.add_task(labels.get(phase, phase), total=total)
            bar.update(ids[phase], completed=done, total=total)

        result = train_local(
            ctx.db, ctx.blobs, plugin, settings.models_dir, options, progress=progress
        )
    if as_json:
        print(json.dumps(_train_json(result), indent=2, sort_keys=True))
        return
    table = Table(
        title=f"{result.task} {result.task_version}: held-out metrics "
        f"({result.n_holdout} studies, seed {seed})"
    )
    table.add_column("metric")
    table.add_column("held out", justify="right")
    table.add_column("training", justify="right")
    for name in ("auc", "accuracy", "sensitivity", "specificity", "mcc"):
        table.add_row(
            name.upper() if name in ("auc", "mcc") else name,
            _fmt(getattr(result.holdout, name)),
            _fmt(getattr(result.train, name)),
        )
    console.print(table)
    if result.skipped:
        console.print(
            f"[yellow]{len(result.skipped)} labelled studies left out[/] "
            "(no accepted image or preprocessing failed; see the log)"
        )
    console.print(
        f"model {result.model_id} (architecture {result.architecture_hash[:12]}, "
        f"max |logit| {result.max_abs_logit:.2f}) saved to {result.artifact}"
    )


# ---------------------------------------------------------------------------------------------
# synth


def synth(
    out: Annotated[Path, typer.Option("--out", help="folder to write (must be empty)")],
    studies: Annotated[int, typer.Option("--studies", min=1, help="number of studies")] = 100,
    task: Annotated[
        str, typer.Option("--task", help='built-in task or "package.module:attr"')
    ] = "chest_xray",
    seed: Annotated[int, typer.Option(help="seed: the same seed gives the same data")] = 0,
    size: Annotated[int, typer.Option(min=64, max=4096, help="image rows and columns")] = 512,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty folder")] = False,
) -> None:
    """Generate SYNTHETIC studies (fake identities, invented images) and their labels CSV."""
    from node.tasks.synth import write_synthetic
    from plugins.base import TaskPluginError, resolve_task

    try:
        plugin = resolve_task(task)
    except TaskPluginError as exc:
        raise PluginError(str(exc)) from exc
    with _progress() as bar:
        bar_id = bar.add_task(f"SYNTHETIC {plugin.name} studies", total=studies)
        report = write_synthetic(
            plugin,
            out,
            studies,
            seed=seed,
            image_size=size,
            force=force,
            progress=lambda done, total: bar.update(bar_id, completed=done),
        )
    classes = ", ".join(f"{k}: {v}" for k, v in sorted(report.per_class.items()))
    console.print(
        f"[green]wrote[/] {report.studies} SYNTHETIC studies ({report.files} files; {classes}) "
        f"to {out}\nlabels: {report.labels_csv}\nread first: {report.readme}"
    )
