"""What every ``fednode`` command module shares: the consoles, the common options and the way a
message is printed.

The consoles never hard-wrap: when the output is not a terminal (journald, a file, a pipe) a
long line stays one line, so a log collector sees one record per line. Text that comes from
outside (file names, config keys such as ``[tasks]``, error messages) goes through
:func:`plain`, so rich never reads its brackets as markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
"""Context settings of every typer app and sub-app: ``-h`` is ``--help``."""


def _console(stderr: bool) -> Console:
    probe = Console(stderr=stderr)
    if probe.is_terminal:
        return probe
    # Not a terminal: rich would wrap at 80 columns. Lines stay whole (soft wrap), and tables
    # get room for their longest row.
    return Console(stderr=stderr, soft_wrap=True, width=max(probe.width, 200))


console = _console(stderr=False)
err = _console(stderr=True)


def plain(text: object) -> str:
    """*text* escaped for rich markup: ``[tasks]`` stays ``[tasks]``."""
    return escape(str(text))


def error(message: object) -> None:
    """Print ``error: <message>`` on stderr (the message is not markup)."""
    err.print(f"[red]error:[/] {plain(message)}")


def warn(message: object) -> None:
    """Print ``warning: <message>`` on stderr (the message is not markup)."""
    err.print(f"[yellow]warning:[/] {plain(message)}")


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="config file (default ./fednode.toml, then /etc/fednode/fednode.toml)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="name every file and outcome")]
