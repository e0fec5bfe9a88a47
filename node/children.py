"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent thread exits (Linux
    ``PR_SET_PDEATHSIG``): call it in a forked child, or as ``preexec_fn`` before an exec.
    Elsewhere a no-op (the parent's own SIGTERM path still stops its children)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
