"""``fednode federation enroll|join|status|leave|approve|approvals|revoke``.

:func:`register` adds the group to the ``fednode`` app (one line in ``node/cli.py``).
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from node.cli_common import ConfigOpt, JsonOpt, console, err
from node.config import Settings, load_settings

federation_app = typer.Typer(
    help="Federated learning: enroll this node in a Flower federation, run its SuperNode, "
    "approve the app bundles it may run.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add ``fednode federation`` to *app*."""
    app.add_typer(federation_app, name="federation")


def _settings(config: Path | None) -> Settings:
    return load_settings(config)


@federation_app.command()
def enroll(
    superlink: Annotated[str, typer.Option(help="the SuperLink's Fleet API as HOST:PORT")],
    ca_cert: Annotated[
        Path, typer.Option("--ca-cert", help="PEM root certificate of the federation's TLS")
    ],
    name: Annotated[str | None, typer.Option(help="this site's name in the federation")] = None,
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option(help="replace an existing key")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the node's EC P-384 key pair and record the federation; print what the
    coordinator needs to register the node."""
    from node.federated.enrollment import FederationPaths
    from node.federated.enrollment import enroll as do_enroll

    settings = _settings(config)
    record = do_enroll(settings, superlink, ca_cert, name, force=force)
    paths = FederationPaths.of(settings)
    command = record.register_command(paths)
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "superlink": record.superlink,
                    "name": record.name,
                    "public_key": record.public_key,
                    "public_key_file": str(paths.public_key),
                    "fingerprint": record.fingerprint,
                    "register_command": command,
                }
            )
        )
        return
    console.print(f"[green]enrolled[/] as {record.name!r} for SuperLink {record.superlink}")
    console.print(f"private key  {paths.private_key} (mode 0600, never leaves this node)")
    console.print(f"public key   {paths.public_key}")
    console.print(record.public_key, soft_wrap=True, highlight=False)
    console.print(f"fingerprint  {record.fingerprint}")
    console.print(
        "send the public key file to the coordinator; they register this node with:",
    )
    console.print(f"  {command}", soft_wrap=True, highlight=False)
    console.print("then start the node's SuperNode with: fednode federation join -c <fednode.toml>")


@federation_app.command()
def join(config: ConfigOpt = None) -> None:
    """Start the node's SuperNode (TLS, node key, node config, isolation process) and the
    approval-gated executor; restart them on failure; stop both on SIGTERM."""
    from node.federated.supervisor import Supervisor
    from node.logs import configure_logging

    settings = _settings(config)
    configure_logging(settings.logging.level, settings.logging.format)
    supervisor = Supervisor(settings)

    def _stop(signum: int, frame: Any) -> None:
        supervisor.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    err.print(f"[green]SuperNode started[/] for {supervisor.children[0].cmd[2]}")
    raise typer.Exit(supervisor.run())


def _connectivity(address: str, ca: Path, timeout: float = 5.0) -> str:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return "reachable, TLS certificate verified"
    except ssl.SSLError as exc:
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    except OSError as exc:
        return f"unreachable ({exc.strerror or type(exc).__name__})"


def _registration(log: Path) -> str:
    try:
        tail = log.read_bytes()[-20000:].decode(errors="replace")
    except OSError:
        return "unknown (the SuperNode has not run)"
    refused = max(
        tail.rfind("[code: 2004]"),  # the SuperLink does not know the node's public key
        tail.rfind("[code: 2001]"),  # no key was presented
        tail.rfind("Failed to activate SuperNode"),
    )
    accepted = tail.rfind("SuperNode ID:")
    if accepted > refused:
        return "registered (the SuperLink accepted the node's key)"
    if refused >= 0:
        return "refused by the SuperLink: the node's public key is not registered"
    return "not yet connected"


@federation_app.command()
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Enrollment, key fingerprint, SuperLink connectivity, registration, supervisor."""
    from node.federated.enrollment import FederationPaths, load_approvals, load_enrollment
    from node.federated.supervisor import supervisor_state

    settings = _settings(config)
    paths = FederationPaths.of(settings)
    record = load_enrollment(settings)
    state = supervisor_state(settings)
    out = {
        "name": record.name,
        "superlink": record.superlink,
        "fingerprint": record.fingerprint,
        "connectivity": _connectivity(record.superlink, paths.ca_cert),
        "registration": _registration(paths.log),
        "supervisor": state,
        "approved_bundles": len(load_approvals(paths.approvals)),
    }
    if as_json:
        console.print_json(json.dumps(out, default=str))
        return
    for key, value in out.items():
        console.print(f"{key:17} {value if value is not None else 'not running'}")


@federation_app.command()
def leave(
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False,
) -> None:
    """Remove the node's federation key material (ask the coordinator to deregister it)."""
    from node.federated.enrollment import leave as do_leave
    from node.federated.supervisor import supervisor_state

    settings = _settings(config)
    if supervisor_state(settings) is not None:
        from node.federated.enrollment import FederationError

        raise FederationError("the SuperNode is running; stop `fednode federation join` first")
    if not yes:
        typer.confirm("remove this node's federation key?", abort=True)
    removed = do_leave(settings)
    for path in removed:
        console.print(f"removed {path}")
    if not removed:
        console.print("nothing to remove: the node is not enrolled")


@federation_app.command()
def approve(
    target: Annotated[str, typer.Argument(help="a bundle file (.fab) or its SHA-256 hash")],
    config: ConfigOpt = None,
    note: Annotated[str, typer.Option(help="why (kept with the approval)")] = "",
) -> None:
    """Approve the exact app bundle this node may run (by file or FAB hash)."""
    from node.federated.enrollment import approve as do_approve

    digest, source = do_approve(_settings(config), target, note=note)
    console.print(f"[green]approved[/] {digest} ({source})")


@federation_app.command()
def approvals(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the approved bundle hashes."""
    from node.federated.enrollment import FederationPaths, load_approvals

    settings = _settings(config)
    data = load_approvals(FederationPaths.of(settings).approvals)
    if as_json:
        console.print_json(json.dumps(data))
        return
    table = Table()
    for col in ("FAB hash", "approved at", "source", "note"):
        table.add_column(col)
    for digest, info in sorted(data.items(), key=lambda kv: kv[1].get("approved_at", "")):
        table.add_row(
            digest, info.get("approved_at", ""), info.get("source", ""), info.get("note", "")
        )
    console.print(table)


@federation_app.command()
def revoke(
    digest: Annotated[str, typer.Argument(help="the FAB hash to withdraw")],
    config: ConfigOpt = None,
) -> None:
    """Withdraw the approval of a bundle hash (runs already started are not stopped)."""
    from node.federated.enrollment import FederationError
    from node.federated.enrollment import revoke as do_revoke

    if not do_revoke(_settings(config), digest):
        raise FederationError(f"{digest} is not approved")
    console.print(f"revoked {digest}")
