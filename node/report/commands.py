"""CLI commands of the report/export stage: ``fednode exports list|retry``.

:func:`register` adds them to the ``fednode`` app. Listings show pseudonymous study keys, never
an original identifier (the SR itself stays encrypted in the outbox).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.table import Table
from sqlalchemy import select

from node.cli_common import ConfigOpt, JsonOpt, console
from node.config import load_settings

exports_app = typer.Typer(
    help="Structured Reports sent back to the PACS: list deliveries, retry dead ones.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add ``exports`` to the ``fednode`` *app*."""
    app.add_typer(exports_app, name="exports")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@exports_app.command("list")
def exports_list(
    config: ConfigOpt = None,
    state: Annotated[
        str | None, typer.Option(help="queued, sent, dead or cancelled")
    ] = None,
    limit: Annotated[int, typer.Option(help="rows")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Deliveries of reports to destinations, newest first (by pseudonymous study key)."""
    from node.runtime import open_context
    from storage.models import Report, ReportExport
    from storage.records import ExportState

    if state is not None and state not in {s.value for s in ExportState}:
        states = ", ".join(s.value for s in ExportState)
        raise typer.BadParameter(f"state must be one of {states}")
    ctx = open_context(load_settings(config))
    with ctx.db.session() as session:
        query = (
            select(ReportExport, Report)
            .join(Report, Report.id == ReportExport.report_id)
            .order_by(ReportExport.id.desc())
            .limit(limit)
        )
        if state is not None:
            query = query.where(ReportExport.state == state)
        rows: list[dict[str, Any]] = [
            {
                "id": d.id,
                "report_id": r.id,
                "study_key": r.study_key,
                "study_version": r.study_version,
                "task": r.task,
                "destination": d.destination,
                "state": d.state,
                "report_state": r.state,
                "attempts": d.attempts,
                "last_status": d.last_status,
                "last_error": d.last_error,
                "created_at": _iso(d.created_at),
                "acked_at": _iso(d.acked_at),
                "in_outbox": r.outbox_name is not None,
            }
            for d, r in session.execute(query)
        ]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="exports (newest first)")
    for col in ("id", "report", "study (pseudonym)", "v", "task", "destination", "state",
                "attempts", "status", "last error"):
        table.add_column(col)
    for row in rows:
        status = row["last_status"]
        table.add_row(
            str(row["id"]),
            str(row["report_id"]),
            row["study_key"],
            str(row["study_version"]),
            row["task"],
            row["destination"],
            row["state"],
            str(row["attempts"]),
            "-" if status is None else f"0x{status:04X}",
            (row["last_error"] or "")[:60],
        )
    console.print(table)


@exports_app.command("retry")
def exports_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="dead delivery ids")] = None,
    config: ConfigOpt = None,
    all_dead: Annotated[bool, typer.Option("--all", help="retry every dead delivery")] = False,
) -> None:
    """Re-queue dead deliveries with a fresh attempt budget."""
    from node.pipeline.export import retry_exports
    from node.runtime import open_context

    if not ids and not all_dead:
        raise typer.BadParameter("give delivery ids (from `fednode exports list`) or --all")
    ctx = open_context(load_settings(config))
    n = retry_exports(ctx, None if all_dead else ids)
    console.print(f"re-queued {n} delivery(ies)")
