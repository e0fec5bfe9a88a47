"""The ``fednode`` command line (typer + rich).

Exit codes are :class:`node.errors.ExitCode`: 0 ok, 1 failure, 2 usage, 3 config, 4 secret,
5 database, 6 database not migrated, 7 network, 8 DICOM, 9 de-identification, 10 plugin.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from node import __version__
from node.cli_common import HELP_OPTIONS, ConfigOpt, JsonOpt, console, err, error, plain
from node.config import (
    Settings,
    apply_overrides,
    load_settings,
    parse_peer,
    require_config,
    validated_section,
)
from node.errors import ConfigError, ExitCode, NodeError, SecretError, exit_code_for
from storage.errors import StorageError

app = typer.Typer(
    name="fednode",
    help="fednode: a DICOM node that receives, de-identifies and learns, without leaking PHI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
    # click already says "Did you mean ...?"; typer's own suggestion would repeat it.
    suggest_commands=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
jobs_app = typer.Typer(help="Inspect and operate the job queue.", no_args_is_help=True)
config_app = typer.Typer(help="Show or check the configuration.", no_args_is_help=True)
secret_app = typer.Typer(help="The node's master secret.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
app.add_typer(config_app, name="config")
app.add_typer(secret_app, name="secret")


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    """Load the settings of an initialised node (file → env → flags); a clear error when
    there is no configuration at all."""
    return load_settings(require_config(config), **overrides)


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


SYSTEM_DATA_DIR = Path("/var/lib/fednode")
"""The data folder of a system install (config under /etc)."""


def _default_data_dir(config_dir: Path) -> str:
    """``/var/lib/fednode`` when the config goes under ``/etc`` (a system install: the
    database, spool and images do not belong in ``/etc``), else ``fednode-data`` next to the
    config file."""
    if config_dir.resolve().is_relative_to("/etc"):
        return str(SYSTEM_DATA_DIR)
    return "fednode-data"


def _toml_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


@app.command()
def init(
    directory: Annotated[Path, typer.Option("--dir", help="folder for fednode.toml")] = Path("."),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="folder for the database, spool and images (default: ./fednode-data next to "
            "the config; /var/lib/fednode when --dir is under /etc)",
        ),
    ] = None,
    ae_title: Annotated[str, typer.Option(help="this node's AE title")] = "FEDNODE",
    port: Annotated[int, typer.Option(help="DICOM port (1-65535)")] = 11112,
    peer: Annotated[
        list[str] | None,
        typer.Option(help="allowed calling AE, as AE, AE@HOST or AE@HOST:PORT (repeatable)"),
    ] = None,
) -> None:
    """Write a commented fednode.toml, a new master secret and the database (never overwrites
    a secret; on an initialised node it changes nothing)."""
    from node.config_template import render
    from node.keycheck import fingerprint, key_check_value, record_check_value
    from node.keys import create_master_secret, load_master_secret

    config_path = directory / "fednode.toml"
    if config_path.exists():
        _already_initialised(config_path)
        return
    # Every value is validated as the file's would be, before anything is written.
    validated_section(
        "node", {"ae_title": ae_title}, {"ae_title": "--ae-title"}
    )
    validated_section("dicom", {"port": port}, {"port": "--port"})
    peers = [parse_peer(item) for item in peer or []]
    data = str(data_dir) if data_dir is not None else _default_data_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = render(
        ae_title=ae_title,
        data_dir=_toml_string(data),
        port=port,
        peers=[(p.ae_title, p.host, p.port) for p in peers],
    )
    tmp = config_path.with_name(".fednode.toml.tmp")
    tmp.write_text(text)
    try:
        load_settings(tmp)
    except ConfigError:
        tmp.unlink()
        raise
    tmp.replace(config_path)
    console.print(f"[green]wrote[/] {plain(config_path)}")
    settings = load_settings(config_path)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    create_master_secret(settings.secret_path)
    master = load_master_secret(settings.secret_path)
    console.print(
        f"[green]wrote[/] master secret {plain(settings.secret_path)} (mode 0600; back it up; "
        f"fingerprint {fingerprint(key_check_value(master))})"
    )
    if not settings.database.url:
        from node.runtime import open_database

        db = open_database(settings)
        db.upgrade()
        record_check_value(db, master)
        db.dispose()
        console.print(f"[green]created[/] database {plain(settings.database_url)} (migrated)")
    else:
        console.print(
            "database: run `fednode db upgrade` once the configured database is reachable"
        )
    console.print(
        f"next: fednode --help, or start the node with: fednode serve -c {plain(config_path)}"
    )


def _already_initialised(config_path: Path) -> None:
    """``init`` on a node that exists: say so, check it, change nothing."""
    settings = load_settings(config_path)  # a broken file is named, key by key
    secret = settings.secret_path
    if not secret.exists():
        raise SecretError(
            f"{config_path} exists but its master secret {secret} does not; fednode will not "
            "make a new one next to an existing configuration (the database may belong to the "
            "old secret); fix: restore the secret from your backup, or move the config away "
            "to initialise a new node"
        )
    console.print(
        f"this node is already initialised: config {plain(config_path)}, master secret "
        f"{plain(secret)}; nothing was changed (the other options of this command were not "
        "applied)"
    )
    console.print(
        f"next: edit {plain(config_path)} and check it with `fednode config check -c "
        f"{plain(config_path)}`, or start the node: fednode serve -c {plain(config_path)}; to "
        "create another node, use another --dir"
    )


def _serve_overrides(
    settings: Settings, port: int | None, processes: int | None, workers: int | None
) -> Settings:
    """Apply ``serve``'s flags, each validated as the file's value would be (all problems
    named at once)."""
    problems: list[str] = []
    try:
        settings = apply_overrides(
            settings,
            {"dicom.port": port, "dicom.processes": processes},
            {"dicom.port": "--port", "dicom.processes": "--processes"},
        )
    except ConfigError as exc:
        problems.append(str(exc).removeprefix("invalid option "))
    if workers is not None:
        try:
            lanes = settings.workers.with_count(workers).model_dump()
            checked = validated_section("workers", lanes, {"lanes": "--workers"})
            settings = settings.model_copy(update={"workers": checked})
        except ConfigError as exc:
            problems.append(str(exc).removeprefix("invalid option ").split("; expected")[0])
    if problems:
        raise ConfigError("invalid option " + "; ".join(problems))
    return settings


@app.command()
def serve(
    config: ConfigOpt = None,
    port: Annotated[int | None, typer.Option(help="override dicom.port (1-65535)")] = None,
    workers: Annotated[
        int | None, typer.Option(help="worker processes in every lane (0 = no workers)")
    ] = None,
    processes: Annotated[
        int | None, typer.Option(help="override dicom.processes (0 = one per CPU core)")
    ] = None,
) -> None:
    """Run the node: the DICOM SCP and the workers, until SIGTERM."""
    import logging

    from node.logs import configure_logging
    from node.service import serve as run

    settings = _serve_overrides(settings_from(config), port, processes, workers)
    configure_logging(settings.logging.level, settings.logging.format)

    def ready(message: str) -> None:
        # The service logs the line; print it only when the log level hides it.
        if not logging.getLogger("node.service").isEnabledFor(logging.INFO):
            err.print(plain(message))

    raise typer.Exit(run(settings, ready=ready))


@app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Instances and jobs by state, the spool, dead letters with their last error."""
    from sqlalchemy import func, select

    from node.jobs import lane_depths
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
    lanes = lane_depths(ctx.settings.workers, counts)
    from node.report.status import STEPS, study_progress

    studies = study_progress(ctx.db)
    if as_json:
        out = {
            "studies": [
                {
                    "study_key": p.study_key,
                    "version": p.version,
                    "step": p.step,
                    "instances": p.instances,
                    "times": {k: v.isoformat() if v else None for k, v in p.times.items()},
                }
                for p in studies
            ],
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
            "lanes": [dataclasses.asdict(lane) for lane in lanes],
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
    lt = Table(title="worker lanes")
    for col in ("lane", "kinds", "workers", "queued", "running"):
        lt.add_column(col, justify="right" if col in ("workers", "queued", "running") else "left")
    for lane in lanes:
        lt.add_row(lane.name, ", ".join(lane.kinds), str(lane.workers), str(lane.queued),
                   str(lane.running))
    console.print(lt)
    console.print(
        f"spool: {spool.count} item(s), {_size(spool.total_bytes)}, "
        f"oldest {_age(spool.oldest_written_at)}"
    )
    if studies:
        st_table = Table(title="studies (newest 20, by pseudonym; seconds since received)")
        for col in ("study", "v", "images", "step", *STEPS[1:]):
            st_table.add_column(col)
        for p in studies:
            start = p.times["received"]
            marks = [
                "-" if start is None or p.times[name] is None
                else f"{(p.times[name] - start).total_seconds():.1f}"  # type: ignore[operator]
                for name in STEPS[1:]
            ]
            st_table.add_row(p.study_key, str(p.version), str(p.instances), p.step, *marks)
        console.print(st_table)
    if dead:
        dt = Table(title="dead letters (newest 10)")
        for col in ("id", "kind", "attempts", "last error"):
            dt.add_column(col)
        for j in dead:
            dt.add_row(str(j.id), j.kind, str(j.attempts), plain((j.last_error or "")[:120]))
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
    from node.errors import NetworkError

    try:
        address = PeerAddress.parse(peer)
    except NetworkError as exc:
        raise typer.BadParameter(str(exc), param_hint="PEER") from None
    chosen = calling_ae is not None
    if calling_ae is None:
        try:
            calling_ae = load_settings(config).node.ae_title
        except ConfigError:
            calling_ae = "FEDNODE"
    else:
        validated_section("node", {"ae_title": calling_ae}, {"ae_title": "--calling-ae"})
    try:
        rtt = do_echo(address, calling_ae=calling_ae, timeout=timeout)
    except NetworkError as exc:
        if chosen or "rejected" not in str(exc):
            raise
        raise NetworkError(
            f"{exc}; without --calling-ae fednode calls as this node's AE title "
            f"{calling_ae!r}, and a peer that lists the AE titles it accepts (a fednode node "
            "accepts only its [[dicom.peers]]) rejects any other: pass --calling-ae with a "
            "title the peer knows"
        ) from exc
    console.print(
        f"[green]C-ECHO ok[/] {plain(peer)} as {plain(calling_ae)} in {rtt * 1000:.1f} ms"
    )


# ---------------------------------------------------------------------------------------------
@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOpt = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Migrate the database schema to the newest (or the given) revision."""
    from node.keycheck import record_check_value
    from node.keys import load_master_secret
    from node.runtime import open_database

    settings = settings_from(config)
    db = open_database(settings)
    before = db.current_revision()
    db.upgrade(revision)
    after = db.current_revision()
    if after == db.head_revision():
        try:
            master = load_master_secret(settings.secret_path)
        except SecretError:
            master = None  # recorded by the first `fednode serve` that has the secret
        if master is not None:
            record_check_value(db, master)
    console.print(f"database at revision {after} (was {before or 'empty'})")


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
            plain((j.last_error or "")[:80]),
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
    if ids and all_dead:
        raise typer.BadParameter("give job ids or --all, not both")
    ctx = open_context(settings_from(config))
    if ids:
        _check_dead(ctx, ids)
    n = ctx.queue.retry(None if all_dead else ids)
    console.print(f"re-queued {n} job(s)")


def _check_dead(ctx: Any, ids: list[int]) -> None:
    """Refuse ids that name no job, or a job that is not dead (nothing is re-queued then)."""
    from sqlalchemy import select

    from storage.models import JobRow

    with ctx.db.session() as s:
        states = dict(s.execute(select(JobRow.id, JobRow.state).where(JobRow.id.in_(ids))).all())
    unknown = [i for i in ids if i not in states]
    alive = [f"{i} ({states[i]})" for i in ids if i in states and states[i] != "dead"]
    problems = []
    if unknown:
        problems.append("no job has id " + ", ".join(map(str, unknown)))
    if alive:
        problems.append("not dead, so not retried: " + ", ".join(alive))
    if problems:
        raise typer.BadParameter(
            "; ".join(problems) + " (see `fednode jobs list --state dead`); nothing was re-queued",
            param_hint="IDS",
        )


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
    from storage.errors import DatabaseUnavailable

    settings = settings_from(config)
    url = settings.database_url
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        path = make_url(url).database
        if path and path != ":memory:" and not Path(path).is_file():
            # Opening it would create it (and its folder): a check changes nothing.
            raise DatabaseUnavailable(
                f"the SQLite database {path} does not exist; fix: `fednode init`, or "
                "`fednode db upgrade` to create it, or correct node.data_dir / database.url"
            )
    preflight(settings, check_only=True)
    console.print("[green]configuration, secret and database are ready[/]")


# ---------------------------------------------------------------------------------------------
@secret_app.command("fingerprint")
def secret_fingerprint(
    config: ConfigOpt = None,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="fingerprint this secret file (a backup) instead"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the master secret's fingerprint (for the backup records) and whether it is the
    secret the node's database was initialised with."""
    from node.keycheck import fingerprint, key_check_value, stored_check_value
    from node.keys import load_master_secret

    settings = None if file is not None else settings_from(config)
    path = file if file is not None else settings.secret_path  # type: ignore[union-attr]
    value = key_check_value(load_master_secret(path))
    database: str | None = None
    if settings is not None:
        from node.runtime import open_database

        db = open_database(settings)
        try:
            stored = stored_check_value(db)
        except StorageError:  # unreachable or not migrated: say so
            stored, database = None, "unavailable"
        finally:
            db.dispose()
        if database is None:
            database = "unrecorded" if stored is None else ("match" if stored == value else
                                                              "mismatch")
    if as_json:
        console.print_json(
            json.dumps({"file": str(path), "fingerprint": fingerprint(value), "database": database})
        )
    else:
        console.print(f"{plain(path)}: {fingerprint(value)}")
        notes = {
            "match": "[green]the database was initialised with this secret[/]",
            "mismatch": "[red]the database was initialised with ANOTHER secret[/]",
            "unrecorded": "the database holds no key check value yet (recorded at start)",
            "unavailable": "the database could not be read to compare",
        }
        if database is not None:
            console.print(notes[database])
    if database == "mismatch":
        raise typer.Exit(int(ExitCode.SECRET))


# Commands that live with their area (de-identification, tasks) register themselves here.
def _register_extensions() -> None:
    from node.deid.commands import register as register_deid
    from node.federated.commands import register as register_federation
    from node.inference.commands import register as register_inference
    from node.report.commands import register as register_exports
    from node.tasks.commands import register as register_tasks

    register_deid(app)
    register_tasks(app)
    register_exports(app)
    register_inference(app)
    register_federation(app)


_register_extensions()


def main() -> None:
    """Console entry point: run the app, map errors to messages and exit codes."""
    try:
        # Without standalone mode click returns a typer.Exit's code instead of raising it.
        code = app(standalone_mode=False)
    except (NodeError, StorageError) as exc:
        error(exc)
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
