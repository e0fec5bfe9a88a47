"""A worker keeps its large buffers in the heap (node.service._reuse_large_buffers): a
buffer the size of a CT image, allocated and freed again and again, is not faulted in anew
each time, and the heap a batch needs is faulted in before the first batch."""

from __future__ import annotations

import subprocess
import sys

import pytest

LOOP = """
import resource, sys
if sys.argv[1] == "reuse":
    from node.service import _reuse_large_buffers
    _reuse_large_buffers()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for batch in range(10):  # as a worker's batches: 32 CT-sized outputs, then all freed
    outputs = [b"x" * (512 * 1024 + i) for i in range(32)]
    del outputs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", LOOP, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_are_faulted_in_once_before_the_first_batch() -> None:
    default, reused = faults("default"), faults("reuse")
    pages = 32 * (512 * 1024 // 4096)  # one batch's outputs
    assert default > 5 * pages  # faulted in again for (almost) every batch
    assert reused < pages // 8  # faulted in when the worker started, not in a batch
