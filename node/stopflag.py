"""A stop request that a signal handler may set.

``threading.Event.set()`` takes the event's lock. A signal handler runs in the main thread
between two bytecodes, possibly while that same thread holds the lock inside ``Event.wait()``;
the handler then blocks on a lock its own thread holds and the process hangs (seen with a
second SIGTERM during shutdown). :class:`StopFlag` has the ``Event`` surface the node uses but
``set()`` only assigns an attribute, and ``wait()`` polls in short sleeps.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

_POLL = 0.05


class StopFlag:
    """Set once, from any thread or a signal handler; never blocks the setter."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or *timeout* seconds passed; return whether it is set."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            if deadline is None:
                time.sleep(_POLL)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(_POLL, remaining))
        return self._set

    def set_on_signals(self, *signums: signal.Signals) -> None:
        """Install a handler that sets this flag for each of *signums* (main thread only)."""

        def _handler(signum: int, frame: FrameType | None) -> None:
            self._set = True

        for signum in signums:
            signal.signal(signum, _handler)
