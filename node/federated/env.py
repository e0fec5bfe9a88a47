"""The environment of every Flower process the node starts: no telemetry, no update check.

A hospital node must not call out. Flower sends telemetry events and checks PyPI for updates
unless ``FLWR_TELEMETRY_ENABLED=0`` and ``FLWR_DISABLE_UPDATE_CHECK=1``; both are read when the
events fire, so setting them before the first Flower call in a process is enough, and child
processes inherit them through :func:`flower_env`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

FLOWER_QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def quiet_flower() -> None:
    """Turn Flower's telemetry and update checks off in this process."""
    os.environ.update(FLOWER_QUIET)


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for a Flower child process: *base* (default ``os.environ``) with
    telemetry and update checks off, plus *extra*."""
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_QUIET)
    env.update(extra)
    return env
