"""The write turn: one writer at a time on a SQLite database, across the node's processes.

SQLite lets one transaction write at a time. A writer that finds the lock held waits in
SQLite's busy handler, which *sleeps* between attempts (1, 2, 5, 10, 15, 20, 25, 25, 25, 50,
50, 100 ms): measured with the workers on, a C-STORE group commit spent on average 27 ms per
``BEGIN IMMEDIATE`` asleep behind worker transactions that held the lock for 2-5 ms. The
turn replaces that wait with an ``flock`` on a file beside the database (``<db>-turn``), taken
before ``BEGIN IMMEDIATE`` by every writer of the node:

- a *priority* writer (the SCP's group commit, whose peers wait for the answer) polls for
  the turn at a much finer grain (50 µs, doubling up to 0.5 ms), so that it takes the turn
  within a fraction of a millisecond of its release; it too gives up with
  :class:`~storage.errors.DatabaseUnavailable` after the busy timeout, so that a writer that
  stopped while holding the turn (a CLI suspended with Ctrl-Z) makes the SCP refuse (0xA700)
  rather than hang;
- any other writer (workers, the CLI) polls for the turn with short sleeps (0.5 ms, doubling
  up to 4 ms), so that when the SCP and a worker both wait, the SCP almost always goes first,
  and gives up with :class:`~storage.errors.DatabaseUnavailable` after the busy timeout.

The turn is per thread and re-entrant (a transaction inside a held turn does not take it
again); the threads of one process queue on a mutex before the ``flock``, which belongs to
the process's open file. Writers outside the node (the ``sqlite3`` shell) do not take the
turn: they still meet SQLite's busy timeout.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import DatabaseUnavailable

FIRST_POLL_SECONDS = 0.0005
MAX_POLL_SECONDS = 0.004
PRIORITY_FIRST_POLL_SECONDS = 0.00005
PRIORITY_MAX_POLL_SECONDS = 0.0005
# A receive stamp: when the SCP last committed (CLOCK_MONOTONIC, the same clock in every
# process of the machine).
_STAMP = struct.Struct("<d")


def _thread_priority() -> tuple[int, int]:
    """The calling thread's scheduling policy and nice value."""
    return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _set_thread_priority(policy: int, nice: int) -> None:
    os.sched_setscheduler(0, policy, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


_LEAVE_IDLE: bool | None = None


def may_leave_idle() -> bool:
    """Whether a thread of this process that enters ``SCHED_IDLE`` may leave it again (root,
    or ``RLIMIT_NICE`` covering the thread's nice value, as the systemd unit sets it): probed
    once, in a thread of its own, so that no thread is left stuck at the idle policy."""
    global _LEAVE_IDLE
    if _LEAVE_IDLE is None:
        result: list[bool] = []

        def probe() -> None:
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
                result.append(True)
            except (OSError, AttributeError):
                result.append(False)

        thread = threading.Thread(target=probe, name="sched-probe")
        thread.start()
        thread.join()
        _LEAVE_IDLE = result == [True]
    return _LEAVE_IDLE


def run_idle(idle: bool) -> bool:
    """Run the calling thread under ``SCHED_IDLE`` (*idle*) or back under ``SCHED_OTHER`` at
    its nice value (a worker, while the SCP is receiving: see :meth:`node.worker.Worker.run`).

    An idle-policy thread gets only CPU time no normal thread wants, and a normal thread that
    wakes (an SCP thread with a PDU to read) preempts it at once, where a thread at nice 10
    still takes about a tenth of a contended CPU and can delay a waking thread by a
    scheduler slice. Returns ``False`` where the OS refuses the change, and does not enter
    ``SCHED_IDLE`` where the process could not leave it (:func:`may_leave_idle`)."""
    if idle and not may_leave_idle():
        return False
    want = os.SCHED_IDLE if idle else os.SCHED_OTHER
    try:
        if os.sched_getscheduler(0) != want:
            os.sched_setscheduler(0, want, os.sched_param(0))
    except OSError:
        return False
    return True


def is_idle() -> bool:
    """Whether the calling thread runs under ``SCHED_IDLE`` (see :func:`run_idle`)."""
    try:
        return os.sched_getscheduler(0) == os.SCHED_IDLE
    except OSError:
        return False


def _raise_to_normal_priority() -> tuple[int, int] | None:
    """Priority ceiling: a thread running below normal CPU priority (a worker: ``workers.nice``,
    or ``SCHED_IDLE`` while the SCP is receiving) runs at normal priority while it holds the
    turn, so that it is not preempted by the very SCP threads that wait for the turn
    (priority inversion). Returns the policy and nice value to go back to, or ``None`` if
    there was nothing to do or the process may not raise its priority (unprivileged without
    ``RLIMIT_NICE``: the worker then holds the turn at its own priority)."""
    global _CEILING_ALLOWED
    if not _CEILING_ALLOWED:
        return None
    try:
        before = _thread_priority()
        if before == (os.SCHED_OTHER, 0) or before[1] < 0:
            return None
        _set_thread_priority(os.SCHED_OTHER, 0)
    except OSError:
        _CEILING_ALLOWED = False
        return None
    return before


_CEILING_ALLOWED = True


class _ProcessFile:
    """A file this process keeps open (``O_RDWR | O_CREAT``, mode 0600); a forked child
    opens its own (an ``flock`` belongs to the open file, and a child must not share it)."""

    path: Path

    def __init__(self) -> None:
        self._fd: tuple[int, int] | None = None  # (pid, fd)

    def _open(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._fd[0] != pid:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._fd = (pid, fd)
        return self._fd[1]

    def close(self) -> None:
        """Close the file (it is reopened on the next use)."""
        if self._fd is not None and self._fd[0] == os.getpid():
            try:
                os.close(self._fd[1])
            except OSError:
                pass
        self._fd = None


class WriteTurn(_ProcessFile):
    """The turn on the database file *db_path*: an ``flock`` on ``<db_path>-turn``.

    Parameters
    ----------
    db_path : Path
        The SQLite database file.
    timeout_seconds : float
        How long a non-priority writer waits for the turn before giving up.
    """

    def __init__(self, db_path: Path, *, timeout_seconds: float) -> None:
        self.path = db_path.with_name(db_path.name + "-turn")
        self.timeout = timeout_seconds
        self._mutex = threading.Lock()
        self._local = threading.local()
        super().__init__()

    @property
    def held(self) -> bool:
        """Whether the calling thread holds the turn."""
        return bool(getattr(self._local, "depth", 0))

    @contextmanager
    def hold(self, *, priority: bool = False) -> Iterator[None]:
        """Hold the turn for the ``with`` block (re-entrant within a thread).

        Raises
        ------
        DatabaseUnavailable
            If a non-priority writer did not get the turn within the timeout, or the turn
            file cannot be opened or locked.
        """
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        deadline = time.monotonic() + self.timeout
        if not self._mutex.acquire(timeout=max(self.timeout, 0.001)):
            raise DatabaseUnavailable("database sqlite unavailable: the write turn stayed busy")
        try:
            try:
                fd = self._open()
                if priority:
                    self._poll(fd, deadline, PRIORITY_FIRST_POLL_SECONDS,
                               PRIORITY_MAX_POLL_SECONDS)
                else:
                    self._poll(fd, deadline, FIRST_POLL_SECONDS, MAX_POLL_SECONDS)
            except OSError as exc:
                raise DatabaseUnavailable(
                    f"database sqlite unavailable: cannot take the write turn ({exc.strerror})"
                ) from exc
            restore = _raise_to_normal_priority()
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0
                try:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:  # closing the file releases the lock as well
                    self.close()
                if restore is not None:
                    _set_thread_priority(*restore)
        finally:
            self._mutex.release()

    def _poll(self, fd: int, deadline: float, first: float, cap: float) -> None:
        pause = first
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if time.monotonic() >= deadline:
                raise DatabaseUnavailable(
                    "database sqlite unavailable: the write turn stayed busy"
                )
            time.sleep(pause)
            pause = min(pause * 2, cap)


class ReceiveStamp(_ProcessFile):
    """When the SCP last committed received instances: 8 bytes in *path* (in the data folder),
    written by the SCP after each group commit and read by the workers, on any database.

    Page cache only, never synced: a hint for the workers (a burst is under way; new jobs
    are due), not a record. One ``pwrite`` or ``pread``, cheap enough to do at every commit and
    to poll every few milliseconds.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def mark(self) -> None:
        """Record that the SCP committed now (errors are ignored: a hint only)."""
        try:
            os.pwrite(self._open(), _STAMP.pack(time.monotonic()), 0)
        except OSError:
            self.close()

    def last(self) -> float | None:
        """When the SCP last committed (``time.monotonic()``), or ``None`` if it has not."""
        try:
            data = os.pread(self._open(), _STAMP.size, 0)
        except OSError:
            self.close()
            return None
        if len(data) < _STAMP.size:
            return None
        (stamp,) = _STAMP.unpack(data)
        return float(stamp)

    def active(self, within_seconds: float) -> bool:
        """Whether the SCP committed within the last *within_seconds*: receive is under way."""
        stamp = self.last()
        return stamp is not None and time.monotonic() - stamp < within_seconds
