"""``fednode serve``: a supervisor with SCP processes and worker processes.

The supervisor checks everything that can be wrong before anything listens (config, master
secret, database reachable and migrated, task plugins), binds the DICOM port once, and forks:

- ``dicom.processes`` SCP processes that accept on the shared listening socket (the kernel
  hands each connection to one of them, so the node uses every core despite the GIL);
- worker processes in lanes (``[workers.lanes.<name>]``): each lane's processes lease and run
  only its job kinds, so a slow kind never holds up another lane.

Children die with the supervisor (``PR_SET_PDEATHSIG``), so a killed node never leaves a
half-alive child holding the port. A child that dies unexpectedly is restarted with backoff.

SIGTERM or SIGINT: the SCP processes stop accepting associations, finish the in-flight ones
(up to ``dicom.shutdown_grace_seconds``), the workers finish or give back their job, and the
supervisor exits 0.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

from node.children import die_with_parent
from node.config import Settings
from node.errors import NetworkError
from node.logs import configure_logging
from node.stopflag import StopFlag

logger = logging.getLogger(__name__)

def preflight(settings: Settings, *, check_only: bool = False) -> None:
    """Everything ``serve`` checks before it listens; raises a NodeError/StorageError.

    With *check_only* (``fednode config check``) nothing is created or recorded.
    """
    from node.jobs import load_handlers
    from node.keycheck import verify_master_secret
    from node.keys import NodeKeys, load_master_secret
    from node.runtime import open_database

    master = load_master_secret(settings.secret_path)
    NodeKeys.from_master(master)
    db = open_database(settings)
    try:
        db.check_reachable()
        db.check_migrated()
        verify_master_secret(db, master, record=not check_only)
    finally:
        db.dispose()
    load_handlers()
    from node.tasks import load_tasks

    load_tasks(settings)
    if not check_only:
        settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _fork(
    context: Any, target: Callable[..., None], args: tuple[Any, ...], name: str
) -> BaseProcess:
    """Start a child with SIGTERM/SIGINT blocked: until the child has installed its own
    handlers, a stop signal stays pending instead of running the supervisor's handler (which,
    copied into the child, would set a flag that nothing there reads)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        process: BaseProcess = context.Process(target=target, args=args, name=name, daemon=False)
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return process


def _child_stop_flag() -> StopFlag:
    """In a child started by :func:`_fork`: its own stop flag, then the signals unblocked."""
    stop = StopFlag()
    stop.set_on_signals(*_STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return stop


def _scp_main(settings: Settings, listening: socket.socket, processes: int) -> None:
    stop = _child_stop_flag()
    die_with_parent()
    configure_logging(settings.logging.level, settings.logging.format)
    from node.dicom.receive import Receiver
    from node.dicom.scp import StorageSCP
    from node.runtime import open_context
    from storage.errors import StorageError

    # Migration was checked by the supervisor's preflight; a child (re)started while the
    # database is down must still come up and answer 0xA700 rather than not answer at all.
    ctx = open_context(settings, check_migrated=False)
    receiver = Receiver(
        db=ctx.db,
        queue=ctx.queue,
        spool=ctx.spool,
        site_key=ctx.keys.site,
        data_dir=settings.data_dir,
        free_space_floor_bytes=settings.dicom.free_space_floor_mb * 1024 * 1024,
        max_instance_bytes=settings.dicom.max_instance_mb << 20,
        max_inflated_bytes=settings.dicom.max_inflated_mb << 20,
    )
    scp = StorageSCP(settings, receiver, processes=processes)
    ctx.db.warm_up()
    # Everything built so far (modules, contexts, engine) lives as long as the process: move it
    # out of the collector's reach. A full collection otherwise walks ~10^5 objects (≈ 50 ms
    # with the GIL held, stalling every association), and pynetdicom's server forces one every
    # 60 accept-loop turns.
    gc.collect()
    gc.freeze()
    # The association threads of a process hand the GIL over at every receive, fsync and
    # commit. With the default 5 ms switch interval a thread whose I/O has finished waits up
    # to 5 ms for a CPU-bound neighbour; 1 ms keeps the stores of all associations moving.
    sys.setswitchinterval(0.001)
    thread = threading.Thread(target=scp.serve, args=(listening,), name="scp-accept", daemon=True)
    thread.start()
    stop.wait()
    aborted = scp.stop(settings.dicom.shutdown_grace_seconds)
    if aborted:
        logger.warning("aborted %d association(s) still open after the grace period", aborted)
    try:
        ctx.spool.close()
    except StorageError as exc:  # every acknowledged record was synced before its answer
        logger.warning("could not close the spool cleanly: %s", exc)
    ctx.db.dispose()
    sys.exit(0)


def _worker_main(settings: Settings, lane: str, index: int) -> None:
    stop = _child_stop_flag()
    die_with_parent()
    configure_logging(settings.logging.level, settings.logging.format)
    from node.jobs import load_handlers
    from node.runtime import open_context
    from node.worker import Worker

    # Migration was checked by the supervisor's preflight; a worker (re)started while the
    # database is down must still come up (it retries its lease until the database is back).
    _reuse_large_buffers()
    ctx = open_context(settings, check_migrated=False)
    _lower_priority(settings.workers.nice)
    kinds = settings.workers.lanes[lane].kinds
    worker = Worker(
        ctx,
        load_handlers(),
        kinds=kinds,
        name=f"{socket.gethostname()}:{lane}{index}:{os.getpid()}",
    )

    worker.stop = stop
    ctx.db.warm_up()
    worker.warm_up()
    # As in the SCP (_scp_main): what start-up built (the handlers' modules, the engine) lives
    # as long as the process; frozen, a full collection no longer walks it. Measured with the
    # workers on, each worker's first batch otherwise held the write turn for 120-165 ms (a
    # full collection inside it, the receive path's commits waiting), against 10 ms after.
    gc.collect()
    gc.freeze()

    def _watchdog() -> None:
        # Started before any signal can arrive (a signal handler must not start threads).
        worker.stop.wait()
        time.sleep(settings.dicom.shutdown_grace_seconds)
        job = worker.current
        if job is not None:
            logger.warning("giving job %d back: still running after the grace period", job.id)
            worker.release_current()
        os._exit(0)

    threading.Thread(target=_watchdog, name="stop-watchdog", daemon=True).start()
    worker.run()
    ctx.db.dispose()
    sys.exit(0)


# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit
_TRIM_THRESHOLD = 128 << 20
_PREFAULT_BYTES = 32 << 20  # what a batch of 32 CT instances holds at once, about


def _reuse_large_buffers() -> None:
    """Keep a worker's large buffers in the heap (glibc): a CT instance passes through three
    buffers of its size (the spool record, the engine's output, the decrypted bytes), each
    above malloc's default mmap threshold, so each was a fresh ``mmap`` whose pages were
    faulted in and zeroed, then unmapped. Measured draining 200 CT instances in one worker:
    138 page faults and 2.7-3.0 ms of CPU per instance, against 23 and 2.2-2.5 ms with
    the threshold raised (four alternating runs). Freed memory stays in the heap up to
    ``_TRIM_THRESHOLD`` (a batch of 32 CT instances needs ~50 MB). Elsewhere than glibc,
    nothing changes."""
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    # Fault the heap in now, not in the first batch: written to, then freed, these chunks
    # stay in the heap (below the trim threshold). Measured in the first batch of a fresh
    # worker: ~4,600 page faults and 80-100 ms of system time for 32 CT instances (a page
    # fault costs ~20 us on a virtual machine), against a few faults in the batches after.
    chunks = [b"\x01" * (4 << 20) for _ in range(_PREFAULT_BYTES >> 22)]
    del chunks


def _lower_priority(nice: int) -> None:
    """Run this worker process (every thread it starts from now on) at *nice*: on a busy CPU
    the SCP's association threads, whose peers wait for each answer, run first. While a
    worker holds the database's write turn it runs at normal priority again
    (:mod:`storage.turn`)."""
    if nice <= 0:
        return
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        logger.warning("cannot lower the worker's CPU priority to nice %d: %s", nice, exc)


@dataclass
class _Child:
    name: str
    start: Callable[[], BaseProcess]
    process: BaseProcess
    restarts: int = 0
    next_start: float = 0.0


def serve(settings: Settings, *, ready: Callable[[str], None] | None = None) -> int:
    """Run the node until SIGTERM/SIGINT; return the exit code."""
    preflight(settings)
    cfg = settings.dicom
    from node.dicom.sockets import listen_socket

    try:
        listening = listen_socket(cfg.host, cfg.port)
    except OSError as exc:
        raise NetworkError(
            f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}; fix: free the port or set "
            "dicom.port (FEDNODE_DICOM__PORT)"
        ) from exc

    context = mp.get_context("fork")
    processes = settings.scp_processes
    children: list[_Child] = []

    def _spawn_scp(i: int) -> Callable[[], BaseProcess]:
        def start() -> BaseProcess:
            return _fork(context, _scp_main, (settings, listening, processes), f"scp-{i}")
        return start

    def _spawn_worker(lane: str, i: int) -> Callable[[], BaseProcess]:
        def start() -> BaseProcess:
            return _fork(context, _worker_main, (settings, lane, i), f"worker-{lane}-{i}")
        return start

    stopping = StopFlag()
    stopping.set_on_signals(*_STOP_SIGNALS)

    for i in range(processes):
        start = _spawn_scp(i)
        children.append(_Child(f"scp-{i}", start, start()))
    for lane_name, lane in settings.workers.lanes.items():
        for i in range(lane.count):
            start = _spawn_worker(lane_name, i)
            children.append(_Child(f"worker-{lane_name}-{i}", start, start()))
    lanes = ", ".join(f"{n} {lane.count}" for n, lane in settings.workers.lanes.items())

    message = (
        f"fednode listening on {cfg.host}:{cfg.port} as AE {settings.node.ae_title} "
        f"({processes} SCP process(es), worker lanes: {lanes})"
    )
    logger.info(message)
    if ready is not None:
        ready(message)

    while not stopping.is_set():
        now = time.monotonic()
        for child in children:
            if child.process.is_alive() or stopping.is_set():
                continue
            if child.next_start == 0.0:
                child.restarts += 1
                delay = min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                child.next_start = now + delay
                logger.error("%s exited with code %s; restarting in %.1f s",
                             child.name, child.process.exitcode, delay)
            elif now >= child.next_start:
                child.process = child.start()
                child.next_start = 0.0
        stopping.wait(0.5)

    logger.info("stopping: finishing in-flight associations and jobs")
    for child in children:
        if child.process.is_alive() and child.process.pid:
            os.kill(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.shutdown_grace_seconds + 10
    for child in children:
        child.process.join(max(0.1, deadline - time.monotonic()))
        if child.process.is_alive() and child.process.pid:
            logger.warning("%s did not stop in time; killing it", child.name)
            os.kill(child.process.pid, signal.SIGKILL)
            child.process.join(5)
    listening.close()
    logger.info("fednode stopped")
    return 0
