"""The ``fednode`` command line (typer + rich).

Exit codes are :class:`node.errors.ExitCode`: 0 ok, 1 failure, 2 usage, 3 config, 4 secret,
5 database, 6 database not migrated, 7 network, 8 DICOM, 9 de-identification, 10 plugin.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from node import __version__
from node.cli_common import ConfigOpt, JsonOpt, console, err
from node.config import Settings, load_settings
from node.errors import ConfigError, ExitCode, NodeError, exit_code_for
from storage.errors import StorageError

app = typer.Typer(
    name="fednode",
    help="fednode: a DICOM node that receives, de-identifies and learns, without leaking PHI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and operate the job queue.", no_args_is_help=True)
config_app = typer.Typer(help="Show or check the configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(config_app, name="config")


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    """Load the settings for a command (file → env → flags)."""
    return load_settings(config, **overrides)


def _age(ts: float | datetime | None) -> str:
    if ts is None:
        return "-"
    seconds = (
        (time.time() - ts) if isinstance(ts, float) else (datetime.now(UTC) - ts).total_seconds()
    )
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        console.print(f"fednode {__version__}")
        raise typer.Exit(0)


@app.command()
def init(
    directory: Annotated[Path, typer.Option("--dir", help="folder for fednode.toml")] = Path("."),
    ae_title: Annotated[str, typer.Option(help="this node's AE title")] = "FEDNODE",
    port: Annotated[int, typer.Option(help="DICOM port")] = 11112,
    peer: Annotated[
        list[str] | None,
        typer.Option(help="allowed calling AE, as AE or AE@HOST (repeatable)"),
    ] = None,
) -> None:
    """Write a commented fednode.toml and a new master secret (never overwrites a secret)."""
    from node.config_template import render
    from node.keys import create_master_secret

    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "fednode.toml"
    peers = []
    for item in peer or []:
        ae, _, host = item.partition("@")
        peers.append((ae, host or None))
    if config_path.exists():
        console.print(f"[yellow]kept[/] existing {config_path}")
    else:
        config_path.write_text(render(ae_title=ae_title, port=port, peers=peers))
        console.print(f"[green]wrote[/] {config_path}")
    settings = load_settings(config_path)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_master_secret(settings.secret_path)
    console.print(f"[green]wrote[/] master secret {settings.secret_path} (mode 0600; back it up)")
    if not settings.database.url:
        from node.runtime import open_database

        db = open_database(settings)
        db.upgrade()
        console.print(f"[green]created[/] database {settings.database_url} (migrated)")
    console.print(f"next: fednode --help, or start the node with: fednode serve -c {config_path}")


@app.command()
def serve(
    config: ConfigOpt = None,
    port: Annotated[int | None, typer.Option(help="override dicom.port")] = None,
    workers: Annotated[int | None, typer.Option(help="override workers.count")] = None,
    processes: Annotated[int | None, typer.Option(help="override dicom.processes")] = None,
) -> None:
    """Run the node: the DICOM SCP and the workers, until SIGTERM."""
    from node.logs import configure_logging
    from node.service import serve as run

    settings = settings_from(config)
    updates: dict[str, Any] = {}
    if port is not None or processes is not None:
        dicom = settings.dicom.model_copy(
            update={
                k: v for k, v in {"port": port, "processes": processes}.items() if v is not None
            }
        )
        updates["dicom"] = dicom
    if workers is not None:
        updates["workers"] = settings.workers.model_copy(update={"count": workers})
    if updates:
        settings = settings.model_copy(update=updates)
    configure_logging(settings.logging.level, settings.logging.format)
    raise typer.Exit(run(settings, ready=lambda msg: err.print(f"[green]{msg}[/]")))


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Instances and jobs by state, the spool, dead letters with their last error."""
    from sqlalchemy import func, select

    from node.runtime import open_context
    from storage.models import Instance
    from storage.records import JobState

    ctx = open_context(settings_from(config))
    with ctx.db.session() as s:
        instances = {
            st: int(n)
            for st, n in s.execute(select(Instance.state, func.count()).group_by(Instance.state))
        }
    counts = ctx.queue.counts()
    dead = ctx.queue.list(state=JobState.DEAD, limit=10)
    spool = ctx.spool.stats()
    if as_json:
        out = {
            "instances": instances,
            "jobs": [
                {"kind": k, "state": st.value, "count": n} for (k, st), n in sorted(counts.items())
            ],
            "spool": {
                "items": spool.count,
                "bytes": spool.total_bytes,
                "oldest": datetime.fromtimestamp(spool.oldest_written_at, UTC).isoformat()
                if spool.oldest_written_at
                else None,
            },
            "dead_letters": [
                {"id": j.id, "kind": j.kind, "attempts": j.attempts, "last_error": j.last_error}
                for j in dead
            ],
        }
        console.print_json(json.dumps(out))
        return
    table = Table(title="instances")
    table.add_column("state")
    table.add_column("count", justify="right")
    for st, n in sorted(instances.items()):
        table.add_row(st, str(n))
    console.print(table)
    jt = Table(title="jobs")
    jt.add_column("kind")
    for st in JobState:
        jt.add_column(st.value, justify="right")
    for kind in sorted({k for k, _ in counts}):
        jt.add_row(kind, *[str(counts.get((kind, st), 0)) for st in JobState])
    console.print(jt)
    console.print(
        f"spool: {spool.count} item(s), {_size(spool.total_bytes)}, "
        f"oldest {_age(spool.oldest_written_at)}"
    )
    if dead:
        dt = Table(title="dead letters (newest 10)")
        for col in ("id", "kind", "attempts", "last error"):
            dt.add_column(col)
        for j in dead:
            dt.add_row(str(j.id), j.kind, str(j.attempts), (j.last_error or "")[:120])
        console.print(dt)


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="AE@HOST:PORT")],
    config: ConfigOpt = None,
    calling_ae: Annotated[str | None, typer.Option(help="calling AE title")] = None,
    timeout: Annotated[float, typer.Option(help="seconds")] = 10.0,
) -> None:
    """C-ECHO a DICOM peer (Verification SOP class)."""
    from node.dicom.scu import PeerAddress
    from node.dicom.scu import echo as do_echo

    address = PeerAddress.parse(peer)
    if calling_ae is None:
        try:
            calling_ae = settings_from(config).node.ae_title
        except ConfigError:
            calling_ae = "FEDNODE"
    rtt = do_echo(address, calling_ae=calling_ae, timeout=timeout)
    console.print(f"[green]C-ECHO ok[/] {peer} in {rtt * 1000:.1f} ms")


# ---------------------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Migrate the database schema to the newest (or the given) revision."""
    from node.runtime import open_database

    settings = settings_from(config)
    db = open_database(settings)
    before = db.current_revision()
    db.upgrade(revision)
    console.print(f"database at revision {db.current_revision()} (was {before or 'empty'})")


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Print the schema revision and whether it is the newest."""
    from node.runtime import open_database

    db = open_database(settings_from(config))
    current, head = db.current_revision(), db.head_revision()
    console.print(f"current {current or '(none)'}; newest {head}")
    if current != head:
        raise typer.Exit(ExitCode.NOT_MIGRATED)


# ---------------------------------------------------------------------------------------------
@jobs_app.command("list")
def jobs_list(
    config: ConfigOpt = None,
    state: Annotated[str | None, typer.Option(help="queued, leased, done or dead")] = None,
    kind: Annotated[str | None, typer.Option(help="job kind, e.g. deidentify")] = None,
    limit: Annotated[int, typer.Option(help="rows")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    from node.runtime import open_context
    from storage.records import JobState

    try:
        job_state = JobState(state) if state else None
    except ValueError:
        states = ", ".join(s.value for s in JobState)
        raise typer.BadParameter(f"state must be one of {states}") from None
    ctx = open_context(settings_from(config))
    jobs = ctx.queue.list(state=job_state, kind=kind, limit=limit)
    if as_json:
        console.print_json(
            json.dumps(
                [
                    {
                        "id": j.id,
                        "kind": j.kind,
                        "state": j.state.value,
                        "attempts": j.attempts,
                        "max_attempts": j.max_attempts,
                        "run_after": j.run_after.isoformat(),
                        "last_error": j.last_error,
                    }
                    for j in jobs
                ]
            )
        )
        return
    table = Table()
    for col in ("id", "kind", "state", "attempts", "run after", "last error"):
        table.add_column(col)
    for j in jobs:
        table.add_row(
            str(j.id),
            j.kind,
            j.state.value,
            f"{j.attempts}/{j.max_attempts}",
            j.run_after.strftime("%Y-%m-%d %H:%M:%S"),
            (j.last_error or "")[:80],
        )
    console.print(table)


@jobs_app.command("retry")
def jobs_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="dead job ids")] = None,
    config: ConfigOpt = None,
    all_dead: Annotated[bool, typer.Option("--all", help="retry every dead job")] = False,
) -> None:
    """Re-queue dead-lettered jobs with a fresh attempt budget."""
    from node.runtime import open_context

    if not ids and not all_dead:
        raise typer.BadParameter("give job ids or --all")
    ctx = open_context(settings_from(config))
    n = ctx.queue.retry(None if all_dead else ids)
    console.print(f"re-queued {n} job(s)")


@jobs_app.command("purge")
def jobs_purge(
    state: Annotated[str, typer.Option(help="done or dead")],
    config: ConfigOpt = None,
    older_than_days: Annotated[float | None, typer.Option(help="only jobs older than this")] = None,
) -> None:
    """Delete finished (done) or dead-lettered jobs."""
    from node.runtime import open_context
    from storage.records import JobState

    if state not in ("done", "dead"):
        raise typer.BadParameter("state must be done or dead")
    ctx = open_context(settings_from(config))
    age = timedelta(days=older_than_days) if older_than_days is not None else None
    n = ctx.queue.purge(JobState(state), older_than=age)
    console.print(f"purged {n} {state} job(s)")


# ---------------------------------------------------------------------------------------------
@config_app.command("show")
def config_show(config: ConfigOpt = None) -> None:
    """Print the effective configuration (file → env), secrets masked."""
    settings = settings_from(config)
    console.print(f"# from {settings.source_file or '(defaults and environment only)'}")
    console.print_json(json.dumps(settings.redacted(), default=str))


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the configuration, the master secret and the database; exit non-zero if bad."""
    from node.service import preflight

    settings = settings_from(config)
    preflight(settings)
    console.print("[green]configuration, secret and database are ready[/]")


# Commands that live with their area (de-identification, tasks) register themselves here.
def _register_extensions() -> None:
    from node.deid.commands import register as register_deid
    from node.federated.commands import register as register_federation
    from node.tasks.commands import register as register_tasks

    register_deid(app)
    register_tasks(app)
    register_federation(app)


_register_extensions()


def main() -> None:
    """Console entry point: run the app, map errors to messages and exit codes."""
    try:
        # Without standalone mode click returns a typer.Exit's code instead of raising it.
        code = app(standalone_mode=False)
    except (NodeError, StorageError) as exc:
        err.print(f"[red]error:[/] {exc}")
        sys.exit(int(exit_code_for(exc)))
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except KeyboardInterrupt:
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(int(ExitCode.USAGE))
        raise
    sys.exit(int(code or 0))


if __name__ == "__main__":
    main()
