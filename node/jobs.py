"""The job framework: job kinds, their typed payloads, the handler and sweep registries, lanes.

A *job* is one unit of work in the database queue (:mod:`storage.queue`). Its kind is a
:class:`JobKind`; its payload is the frozen dataclass :data:`PAYLOADS` names for that kind,
stored as JSON and parsed once, by the worker, when the job is leased (a payload that does not
parse dead-letters the job). Payloads hold pseudonymous keys and row ids only, never PHI.

A handler is ``handler(job, payload, ctx) -> None``, registered with :func:`register`.
Returning means done. Raising :class:`PermanentJobError` dead-letters the job at once with the
message; any other exception is retried with exponential backoff until
``workers.max_attempts``, then dead-lettered with its last error. Handlers must be idempotent:
a job may run again after a worker died mid-way. Exception messages end up in the jobs table
and ``fednode status``: they must not hold PHI.

Worker processes are grouped in *lanes* (``[workers.lanes.<name>]``): each lane serves a set of
kinds with its own processes, so a slow kind (an ``infer`` job waiting on a CKKS round trip, an
``export`` waiting on a PACS) never holds up de-identification. Periodic sweeps belong to a kind
too and run in the lane that serves it.

Handlers live in :mod:`node.pipeline` (one module per kind); this module imports none of them
until :func:`load_handlers` is called, so domain code (:mod:`node.tasks`, :mod:`node.runtime`)
can use the framework without depending on the pipeline.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, cast

from node.errors import NodeError

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session

    from node.config import Settings, WorkersSection
    from node.keys import NodeKeys
    from storage.blobs import BlobStore
    from storage.db import Database
    from storage.queue import JobQueue
    from storage.records import Job, JobState
    from storage.spool import Spool
    from storage.turn import ReceiveStamp


class JobKind(StrEnum):
    """Every kind of job the node runs, in pipeline order."""

    DEIDENTIFY = "deidentify"
    """A received instance: spool → de-identified blob + vault (PS3.15 Annex E)."""
    ASSEMBLE = "assemble"
    """Study completion after the quiet period (a periodic sweep, not a queued job)."""
    INFER = "infer"
    """One task on one version of a complete study, under CKKS encryption."""
    REPORT = "report"
    """A result → a TID 1500 Structured Report, re-identified from the vault."""
    EXPORT = "export"
    """A report → C-STORE to one destination."""


class PermanentJobError(NodeError):
    """The job cannot succeed by retrying; it is dead-lettered at once."""


# -- payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """Base of the typed payloads; :attr:`KIND` says which kind of job carries it."""

    KIND: ClassVar[JobKind]

    def to_json(self) -> dict[str, Any]:
        """The payload as stored in the jobs table (tuples become lists)."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }


@dataclass(frozen=True)
class DeidentifyPayload(Payload):
    """De-identify the received instance of row ``instances.id == instance_id``."""

    KIND: ClassVar[JobKind] = JobKind.DEIDENTIFY
    instance_id: int


@dataclass(frozen=True)
class InferPayload(Payload):
    """Run *task* on version *study_version* of a complete study, on the instances it accepted."""

    KIND: ClassVar[JobKind] = JobKind.INFER
    study_key: str
    study_version: int
    task: str
    task_version: str
    sop_keys: tuple[str, ...]


@dataclass(frozen=True)
class ReportPayload(Payload):
    """Build the Structured Report of result row ``results.id == result_id``."""

    KIND: ClassVar[JobKind] = JobKind.REPORT
    result_id: int


@dataclass(frozen=True)
class ExportPayload(Payload):
    """Send report *report_id* to the export destination named *destination*."""

    KIND: ClassVar[JobKind] = JobKind.EXPORT
    report_id: int
    destination: str


PAYLOADS: dict[JobKind, type[Payload]] = {
    JobKind.DEIDENTIFY: DeidentifyPayload,
    JobKind.INFER: InferPayload,
    JobKind.REPORT: ReportPayload,
    JobKind.EXPORT: ExportPayload,
}
"""The payload class of every kind that is queued (``assemble`` is a sweep only)."""

_SCALARS: dict[str, type] = {"int": int, "str": str, "float": float, "bool": bool}


def parse_payload(kind: str, data: Mapping[str, Any]) -> Payload:
    """Parse a stored payload of a job of *kind*.

    Raises
    ------
    PermanentJobError
        If *kind* is unknown or *data* does not hold exactly the fields of the kind's payload
        with values of their types (the message names the field, never its value).
    """
    try:
        cls = PAYLOADS[JobKind(kind)]
    except (ValueError, KeyError):
        raise PermanentJobError(f"no payload type for job kind {kind!r}") from None
    if not isinstance(data, Mapping):
        raise PermanentJobError(f"the {kind} job payload is not an object")
    values: dict[str, Any] = {}
    fields = dataclasses.fields(cls)
    unknown = set(data) - {f.name for f in fields}
    if unknown:
        raise PermanentJobError(f"the {kind} job payload has unknown field(s): {sorted(unknown)}")
    for f in fields:
        if f.name not in data:
            raise PermanentJobError(f"the {kind} job payload has no {f.name}")
        value = data[f.name]
        type_name = str(f.type)
        if type_name.startswith("tuple["):
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise PermanentJobError(f"the {kind} job payload's {f.name} is not a list")
            values[f.name] = tuple(value)
            continue
        expected = _SCALARS[type_name]
        if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
            raise PermanentJobError(
                f"the {kind} job payload's {f.name} is not of type {type_name}"
            )
        values[f.name] = value
    return cls(**values)


def deidentify_dedupe_key(sop_key: str) -> str:
    """The dedupe key of the ``deidentify`` job of the instance with pseudonym *sop_key*."""
    return f"{JobKind.DEIDENTIFY.value}:{sop_key}"


def enqueue(
    queue: JobQueue,
    payload: Payload,
    *,
    dedupe_key: str | None = None,
    run_after: datetime | None = None,
    max_attempts: int | None = None,
    session: Session | Connection | None = None,
) -> int | None:
    """Queue a job carrying *payload* (its kind is the payload's); see ``JobQueue.enqueue``."""
    return queue.enqueue(
        payload.KIND.value,
        payload.to_json(),
        dedupe_key=dedupe_key,
        run_after=run_after,
        max_attempts=max_attempts,
        session=session,
    )


# -- the context handlers get ------------------------------------------------------------------


RECEIVE_STAMP_NAME = "receive.stamp"
"""The SCP's commit stamp in the data folder (:attr:`JobContext.receive_stamp`)."""


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
    def receive_stamp(self) -> ReceiveStamp:
        """When the SCP last committed (:class:`storage.turn.ReceiveStamp`)."""
        from storage.turn import ReceiveStamp

        return ReceiveStamp(self.settings.data_dir / RECEIVE_STAMP_NAME)

    @cached_property
    def blobs(self) -> BlobStore:
        from storage.blobs import BlobStore

        return BlobStore(self.settings.blob_dir, self.keys.blobs)


# -- registries -------------------------------------------------------------------------------

P = TypeVar("P", bound=Payload)


class Completed:
    """The outcome of a batch job that the batch function has completed itself, in the
    transaction that recorded its work (``queue.complete_many(jobs, session=...)``)."""

    def __repr__(self) -> str:
        return "COMPLETED"


COMPLETED = Completed()

Outcome = BaseException | Completed | None

BatchFunction = Callable[[list[tuple["Job", P]], "JobContext"], list[Outcome]]
"""A batch handler: ``(jobs with their payloads, ctx) -> one outcome per job`` (``None`` =
done, for the worker to complete; :data:`COMPLETED` = done and completed by the batch
function; an exception = that job failed, as if a plain handler had raised it)."""


class Handler(Generic[P]):
    """A registered handler: the function and the payload class it takes.

    A kind may also have a batch function (:func:`register_batch`): the worker then leases
    up to :attr:`max_batch` jobs of the kind at once and runs them in one call, so that the
    batch shares its database transactions (on SQLite every write transaction is a turn of
    the single write lock the SCP's commits wait for).
    """

    def __init__(self, kind: JobKind, fn: Callable[[Job, P, JobContext], None]) -> None:
        self.kind = kind
        self.fn = fn
        self.batch: BatchFunction[P] | None = None
        self.max_batch = 1
        self.warm_up: Periodic | None = None
        """Run once when a worker of the kind starts (:func:`register_warm_up`)."""

    def __call__(self, job: Job, ctx: JobContext) -> None:
        """Parse *job*'s payload and run the handler on it."""
        payload = cast(P, parse_payload(job.kind, job.payload))
        self.fn(job, payload, ctx)

    def run_batch(self, jobs: list[Job], ctx: JobContext) -> list[Outcome]:
        """Run *jobs* (all of this kind); return one outcome per job, in order.

        A job whose payload does not parse fails with :class:`PermanentJobError` without
        running; the others go to the batch function (or, without one, to the handler one
        at a time).
        """
        outcomes: list[Outcome] = [None] * len(jobs)
        parsed: list[tuple[int, Job, P]] = []
        for i, job in enumerate(jobs):
            try:
                parsed.append((i, job, cast(P, parse_payload(job.kind, job.payload))))
            except PermanentJobError as exc:
                outcomes[i] = exc
        if self.batch is not None and parsed:
            results = self.batch([(job, payload) for _, job, payload in parsed], ctx)
            if len(results) != len(parsed):
                raise RuntimeError(f"the {self.kind} batch handler lost outcomes")
            for (i, _, _), outcome in zip(parsed, results, strict=True):
                outcomes[i] = outcome
            return outcomes
        for i, job, payload in parsed:
            try:
                self.fn(job, payload, ctx)
            except Exception as exc:
                outcomes[i] = exc
        return outcomes


REGISTRY: dict[str, Handler[Any]] = {}
"""Handlers by job kind (keys are :class:`JobKind` members)."""

Periodic = Callable[[JobContext], None]


Interval = float | Callable[["Settings"], float]
"""Seconds between two runs of a sweep: a constant, or read from the settings."""


@dataclass(frozen=True)
class Sweep:
    """A periodic sweep: run by the workers of the lane serving :attr:`kind`."""

    name: str
    every_seconds: Interval
    kind: JobKind
    fn: Periodic

    def interval(self, settings: Settings) -> float:
        """Seconds between two runs under *settings*."""
        every = self.every_seconds
        return float(every(settings) if callable(every) else every)


PERIODIC: dict[str, Sweep] = {}
"""Sweeps the workers run every so many seconds, by name."""

HANDLER_MODULES: tuple[str, ...] = (
    "node.pipeline.assemble",
    "node.pipeline.deidentify",
    "node.pipeline.report",
    "node.pipeline.export",
    "node.pipeline.infer",
)
"""Modules that register handlers and sweeps when imported; each stage adds its module here."""


def register(
    kind: JobKind,
) -> Callable[[Callable[[Job, P, JobContext], None]], Callable[[Job, P, JobContext], None]]:
    """Decorator: make the function the handler of jobs of *kind*.

    The function takes ``(job, payload, ctx)``; *payload* is the parsed :data:`PAYLOADS` class
    of *kind*. It is returned unchanged, so tests may call it directly.
    """

    def deco(fn: Callable[[Job, P, JobContext], None]) -> Callable[[Job, P, JobContext], None]:
        existing = REGISTRY.get(kind)
        if existing is not None and existing.fn is not fn:
            raise ValueError(f"a handler for job kind {kind.value!r} is registered already")
        REGISTRY[kind] = Handler(kind, fn)
        return fn

    return deco


def register_batch(
    kind: JobKind, *, max_jobs: int
) -> Callable[[BatchFunction[P]], BatchFunction[P]]:
    """Decorator: the batch function of *kind*, whose handler is :func:`register`-ed already.

    The function takes up to *max_jobs* ``(job, payload)`` pairs and returns one outcome per
    job (``None`` or the exception it failed with); it must be idempotent per job as a
    handler is. Only for kinds whose jobs are short: every job of a batch stays leased
    until the batch is done.
    """

    def deco(fn: BatchFunction[P]) -> BatchFunction[P]:
        handler = REGISTRY.get(kind)
        if handler is None:
            raise ValueError(f"register the handler of {kind.value!r} before its batch function")
        handler.batch = fn
        handler.max_batch = max(1, max_jobs)
        return fn

    return deco


def register_warm_up(kind: JobKind) -> Callable[[Periodic], Periodic]:
    """Decorator: *fn(ctx)* runs once in each worker serving *kind*, when it starts, to do
    ahead what the kind's first job would otherwise pay for while the SCP waits (compiling
    the statements of its write transaction). It must leave nothing behind; an error is
    logged and ignored."""

    def deco(fn: Periodic) -> Periodic:
        handler = REGISTRY.get(kind)
        if handler is None:
            raise ValueError(f"register the handler of {kind.value!r} before its warm-up")
        handler.warm_up = fn
        return fn

    return deco


def periodic(
    name: str, every_seconds: Interval, *, kind: JobKind
) -> Callable[[Periodic], Periodic]:
    """Decorator: run *fn(ctx)* about every *every_seconds* in the workers serving *kind*.

    *every_seconds* is a number or a function of the settings (for example
    ``lambda s: s.tasks.sweep_seconds``), read by each worker; the first run is when the
    worker starts.

    A sweep must be safe to run concurrently in several worker processes (use the database to
    arbitrate, e.g. by enqueueing jobs with a dedupe key).
    """

    def deco(fn: Periodic) -> Periodic:
        PERIODIC[name] = Sweep(name, every_seconds, kind, fn)
        return fn

    return deco


def load_handlers() -> dict[str, Handler[Any]]:
    """Import every handler module and return the registry."""
    for module in HANDLER_MODULES:
        importlib.import_module(module)
    return REGISTRY


# -- lanes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaneDepth:
    """How much work waits in one lane (``fednode status``)."""

    name: str
    kinds: tuple[str, ...]
    workers: int
    """Worker processes the lane runs (``count``)."""
    queued: int
    """Jobs of the lane's kinds waiting to be leased (including those waiting for a retry)."""
    running: int
    """Jobs of the lane's kinds leased by a worker now."""


def lane_depths(
    workers: WorkersSection, counts: Mapping[tuple[str, JobState], int]
) -> list[LaneDepth]:
    """The depth of every lane of *workers*, from the queue's job counts by (kind, state)."""
    from storage.records import JobState

    out = []
    for name, lane in workers.lanes.items():
        queued = sum(counts.get((k, JobState.QUEUED), 0) for k in lane.kinds)
        running = sum(counts.get((k, JobState.LEASED), 0) for k in lane.kinds)
        out.append(LaneDepth(name, tuple(lane.kinds), lane.count, queued, running))
    return out
