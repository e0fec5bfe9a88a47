"""Job handlers, one module per job kind, dispatched by kind through :data:`REGISTRY`.

A handler is ``handler(job, ctx) -> None``. Returning means done. Raising
:class:`PermanentJobError` dead-letters the job at once with the message; any other exception
is retried with exponential backoff until ``workers.max_attempts``, then dead-lettered with its
last error. Handlers must be idempotent: a job may run again after a worker died mid-way.
Exception messages end up in the jobs table and ``fednode status``: they must not hold PHI.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from node.errors import NodeError

if TYPE_CHECKING:
    from node.config import Settings
    from node.keys import NodeKeys
    from storage.blobs import BlobStore
    from storage.db import Database
    from storage.queue import JobQueue
    from storage.records import Job
    from storage.spool import Spool


class PermanentJobError(NodeError):
    """The job cannot succeed by retrying; it is dead-lettered at once."""


@dataclass
class JobContext:
    """What a handler may use. Built once per worker process."""

    settings: Settings
    db: Database
    queue: JobQueue
    keys: NodeKeys

    @cached_property
    def spool(self) -> Spool:
        from storage.spool import Spool

        return Spool(self.settings.spool_dir, self.keys.spool)

    @cached_property
    def blobs(self) -> BlobStore:
        from storage.blobs import BlobStore

        return BlobStore(self.settings.blob_dir)


Handler = Callable[["Job", JobContext], None]

REGISTRY: dict[str, Handler] = {}

Periodic = Callable[[JobContext], None]
PERIODIC: dict[str, tuple[float, Periodic]] = {}
"""Sweeps the workers run every so many seconds (name -> (interval, function))."""

# Modules that register handlers when imported; a later issue adds its module here.
HANDLER_MODULES: tuple[str, ...] = (
    "node.pipeline.assemble",
    "node.pipeline.deidentify",
    "node.pipeline.report",
    "node.pipeline.export",
)


def register(kind: str) -> Callable[[Handler], Handler]:
    """Decorator: make *handler* the handler of jobs of *kind*."""

    def deco(handler: Handler) -> Handler:
        if kind in REGISTRY and REGISTRY[kind] is not handler:
            raise ValueError(f"a handler for job kind {kind!r} is registered already")
        REGISTRY[kind] = handler
        return handler

    return deco


def periodic(name: str, every_seconds: float) -> Callable[[Periodic], Periodic]:
    """Decorator: run *fn(ctx)* in the workers about every *every_seconds* seconds.

    A sweep must be safe to run concurrently in several worker processes (use the database to
    arbitrate, e.g. by enqueueing jobs with a dedupe key).
    """

    def deco(fn: Periodic) -> Periodic:
        PERIODIC[name] = (every_seconds, fn)
        return fn

    return deco


def load_handlers() -> dict[str, Handler]:
    """Import every handler module and return the registry."""
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    return REGISTRY
