"""The node's side of the AI tasks: loading the enabled task plugins, reading studies for them
from storage, labels, the local dataset and training, synthetic data and their CLI commands.

:func:`load_tasks` is called by ``fednode serve`` before it listens, so a broken plugin
reference stops the node at start-up with a clear message instead of failing every job later.
"""

from __future__ import annotations

import logging
import threading

from node.config import Settings
from node.errors import PluginError
from plugins.base import TaskPlugin, TaskPluginError
from plugins.base import load_tasks as _load_refs

logger = logging.getLogger(__name__)

_cache: dict[tuple[str, ...], dict[str, TaskPlugin]] = {}
_lock = threading.Lock()


def load_tasks(settings: Settings) -> dict[str, TaskPlugin]:
    """The enabled tasks (``[tasks] enabled``) by name, loaded once per process.

    Raises
    ------
    PluginError
        If a reference cannot be resolved (the message names it and the fix).
    """
    refs = tuple(settings.tasks.enabled)
    with _lock:
        cached = _cache.get(refs)
        if cached is not None:
            return dict(cached)
        try:
            tasks = _load_refs(refs)
        except TaskPluginError as exc:
            raise PluginError(
                f"{exc} (configured in [tasks] enabled, or FEDNODE_TASKS__ENABLED)"
            ) from exc
        _cache[refs] = tasks
    logger.info(
        "tasks enabled: %s",
        ", ".join(f"{p.name} {p.version}" for p in tasks.values()) or "(none)",
    )
    return dict(tasks)


def get_task(settings: Settings, name: str) -> TaskPlugin:
    """The enabled task *name*.

    Raises
    ------
    PluginError
        If no enabled task has that name.
    """
    tasks = load_tasks(settings)
    try:
        return tasks[name]
    except KeyError:
        enabled = ", ".join(tasks) or "none"
        raise PluginError(
            f"task {name!r} is not enabled (enabled: {enabled}); add it to [tasks] enabled"
        ) from None
