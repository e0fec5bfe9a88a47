"""Atomic, durable file writes: tmp file + fsync + rename + fsync of the folder."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# O_DIRECT transfers need buffer address, length and file offset aligned to the device's
# logical block size; a page covers every common one.
DIRECT_ALIGN = 4096


def atomic_write(path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o600) -> None:
    """Write *data* to *path* so that after return it survives a crash or power cut.

    A reader never sees a partial file: the bytes go to a temporary name in the same folder,
    are fsynced, renamed over *path*, and the folder entry is fsynced.
    """
    folder = path.parent
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_all(fd, memoryview(data))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(folder)


class AlignedBuffer:
    """A page-aligned, reusable write buffer for ``O_DIRECT`` writes.

    ``view(size)`` returns a writable view of *size* bytes; the buffer behind it extends at
    least to the next :data:`DIRECT_ALIGN` boundary (an anonymous ``mmap`` is page aligned).
    """

    def __init__(self) -> None:
        self._map: mmap.mmap | None = None

    def view(self, size: int) -> memoryview:
        padded = -(-max(size, 1) // DIRECT_ALIGN) * DIRECT_ALIGN
        if self._map is None or len(self._map) < padded:
            # The old map is dropped, not closed: a view of it may still be alive (a
            # traceback); it is unmapped when the last one goes.
            self._map = mmap.mmap(-1, -(-padded // (1 << 20)) * (1 << 20))  # 1 MiB steps
        return memoryview(self._map)[:size]

    def padded(self, size: int) -> memoryview:
        """The first *size* bytes and zeros up to the next block boundary."""
        assert self._map is not None
        end = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
        view = memoryview(self._map)[:end]
        view[size:] = bytes(end - size)  # no bytes of an earlier item in the padding
        return view

    def close(self) -> None:
        self._map = None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename or unlink) to disk."""
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def free_bytes(path: Path) -> int:
    """Free bytes available to this user on the volume holding *path*."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
