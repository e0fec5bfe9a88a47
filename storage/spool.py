"""The encrypted spool: raw received bytes, AES-256-GCM, until de-identification.

(The blob store keeps the de-identified instances in a spool of its own, with its own key:
:mod:`storage.blobs`.)

Items are appended as records to *segment* files, one open segment per concurrent writer of
a process (a *lane*), and named by a locator ``<segment>@<offset>+<length>``. A record is a
header (magic, ciphertext length, time written, nonce), the ciphertext with its tag, and
zeros up to the next 4 KiB boundary. The header and the record's place (segment and offset)
are the associated data, so a record copied elsewhere or a header altered fails
authentication instead of decrypting.

Why segments rather than a file per item: at the receive rate, creating, renaming and
fsyncing one file per instance cost more CPU than everything else the node does with it
(ext4 inode allocation and two journal commits per file). A record costs one ``pwrite``;
:meth:`Spool.sync` makes every record written since the last call durable with one
``fdatasync`` per segment, which the receive path's group commit calls once per batch.

Records are written with ``O_DIRECT`` where the file system allows it: skipping the page
cache saves the copy and, above all, the page allocation. They are encrypted into a
per-thread, page-aligned scratch buffer reused from one record to the next.

Deleting a record punches a hole over it (``fallocate``), which frees its blocks at once;
where the file system cannot punch holes the header's magic is overwritten instead. A
deletion is not synced: one lost to a crash brings back a record nothing needs any more,
which the orphan sweep deletes again. A segment is rotated after ``rotate_seconds`` or
``rotate_bytes``; once no live record is left in it and no writer holds it (each writer keeps
an exclusive ``flock`` on its open segments), :meth:`Spool.remove_empty_segments` removes it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import IntegrityError, SpoolError
from storage.files import DIRECT_ALIGN, AlignedBuffer, fsync_dir

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
_TAG_BYTES = 16
LIVE = b"FNR1"
DEAD = b"FNX1"  # a deleted record where the file system cannot punch holes
# magic, ciphertext length (tag included), time written (Unix seconds), nonce
_HEADER = struct.Struct("<4sQd12s")
_AAD_HEADER = 4 + 8 + 8  # the header's bytes before the nonce
SEGMENT_PREFIX = "seg-"
_LOCATOR = re.compile(r"^(seg-[0-9A-Za-z-]+)@(\d+)\+(\d+)$")
# Scratch buffers above this size are not kept for the next item.
_KEEP_SCRATCH = 64 << 20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
# Segments one process appends to at once, at most (see Spool._writable).
_MAX_LANES = 8
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@dataclass(frozen=True)
class SpoolStats:
    count: int
    total_bytes: int
    oldest_written_at: float | None


@dataclass(frozen=True)
class _Record:
    locator: str
    length: int
    written_at: float


@dataclass(eq=False)
class _Segment:
    """A segment this process appends to (its fields under :attr:`Spool._lock`)."""

    name: str
    fd: int
    direct: bool
    opened: float
    end: int = 0
    writers: int = 0  # records being written now
    dirty: bool = False  # records written since the last sync
    new: bool = True  # its folder entry is not yet synced
    retired: bool = False  # no new records; closed once synced and idle


def _extent(length: int) -> int:
    """Bytes a record of *length* ciphertext bytes occupies, padding included."""
    return -(-(_HEADER.size + length) // DIRECT_ALIGN) * DIRECT_ALIGN


class Spool:
    """Encrypted, durable storage of received bytes, addressed by the locator ``put`` returns."""

    def __init__(
        self,
        root: Path,
        key: bytes,
        *,
        rotate_seconds: float = 600,
        rotate_bytes: int = 1 << 30,
        name: str = "spool",
    ) -> None:
        self.root = root
        self._name = name  # what its errors call it
        self._aead = AESGCM(key)
        self._scratch = threading.local()
        self._direct_reads = bool(_O_DIRECT)
        self._rotate_seconds = rotate_seconds
        self._rotate_bytes = rotate_bytes
        self._lock = threading.Lock()  # the segment list and each segment's counters
        self._sync_lock = threading.Lock()  # one sync at a time (it closes retired segments)
        self._segments: list[_Segment] = []  # open: the lanes, and retired ones not yet closed
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _OPEN.add(self)

    def close(self) -> None:
        """Sync and close the segments this process writes to."""
        with self._sync_lock, self._lock:
            for segment in self._segments:
                segment.retired = True
        self.sync()

    def _forget_segments(self) -> None:
        """In a forked child: the parent's segments are not ours to write, sync or lock."""
        for segment in self._segments:
            os.close(segment.fd)
        self._segments = []
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()

    # -- writing ----------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Encrypt *data* into the spool; return its locator.

        The record is durable once :meth:`sync` has returned after this call.
        """
        length = len(data) + _TAG_BYTES
        extent = _extent(length)
        scratch = self._scratch_buffer(extent)
        try:
            with self._lock:
                segment = self._writable(extent)
                offset = segment.end
                segment.end += extent
                segment.writers += 1
        except OSError as exc:
            raise SpoolError(f"cannot open a {self._name} segment: {exc.strerror}") from exc
        try:
            nonce = os.urandom(NONCE_BYTES)
            header = _HEADER.pack(LIVE, length, time.time(), nonce)
            blob = scratch.view(_HEADER.size + length)
            blob[: _HEADER.size] = header
            aad = _aad(segment.name, offset, header)
            if hasattr(self._aead, "encrypt_into"):  # cryptography >= 46
                self._aead.encrypt_into(nonce, data, aad, blob[_HEADER.size :])
            else:
                blob[_HEADER.size :] = self._aead.encrypt(nonce, bytes(data), aad)
            del blob
            self._write(segment, scratch.padded(_HEADER.size + length), offset)
        except OSError as exc:
            try:
                _discard_range(segment.fd, offset, extent, [offset])  # no half-written record
            except OSError:
                pass  # unreadable anyway; the orphan sweep removes it
            raise SpoolError(f"cannot write to the {self._name}: {exc.strerror}") from exc
        finally:
            with self._lock:
                segment.writers -= 1
                segment.dirty = True
        return f"{segment.name}@{offset}+{length}"

    def sync(self) -> None:
        """Make every record this process has written so far durable."""
        with self._sync_lock:
            with self._lock:
                due = [s for s in self._segments if s.dirty or s.new]
                new = [s for s in due if s.new]
                for segment in due:
                    segment.dirty = segment.new = False
            try:
                if new:
                    fsync_dir(self.root)
                for segment in due:
                    os.fdatasync(segment.fd)
            except OSError as exc:
                with self._lock:
                    for segment in due:
                        segment.dirty = True
                    for segment in new:
                        segment.new = True
                raise SpoolError(f"cannot sync the {self._name}: {exc.strerror}") from exc
            with self._lock:
                done = [s for s in self._segments if s.retired and not s.writers and not s.dirty]
                self._segments = [s for s in self._segments if s not in done]
            for segment in done:
                os.close(segment.fd)  # releases its flock: it may now be removed when empty

    def _scratch_buffer(self, extent: int) -> AlignedBuffer:
        scratch: AlignedBuffer | None = getattr(self._scratch, "buffer", None)
        keep = extent <= _KEEP_SCRATCH
        if scratch is None or not keep:
            scratch = AlignedBuffer()
            if keep:
                self._scratch.buffer = scratch
        return scratch

    def _writable(self, extent: int) -> _Segment:
        """The segment the next record of *extent* bytes goes to (called under the lock).

        Each concurrent writer gets a segment of its own (a *lane*), up to ``_MAX_LANES``:
        ext4 serializes direct writes that extend a file, so two writers appending to one
        file wait for each other. A lane is retired once too old or too full for the record.
        """
        now = time.monotonic()
        least_busy: _Segment | None = None
        lanes = 0
        for segment in self._segments:
            if segment.retired:
                continue
            full = segment.end > 0 and segment.end + extent > self._rotate_bytes
            if full or now - segment.opened >= self._rotate_seconds:
                segment.retired = True
                continue
            if not segment.writers:
                return segment
            lanes += 1
            if least_busy is None or segment.writers < least_busy.writers:
                least_busy = segment
        if least_busy is not None and lanes >= _MAX_LANES:
            return least_busy
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        name = f"{SEGMENT_PREFIX}{stamp}-{os.getpid()}-{secrets.token_hex(4)}"
        path = self.root / name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        direct = bool(_O_DIRECT)
        try:
            fd = os.open(path, flags | _O_DIRECT, 0o600) if direct else os.open(path, flags, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this file system
                raise
            direct = False
            fd = os.open(path, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        segment = _Segment(name, fd, direct, time.monotonic())
        self._segments.append(segment)
        return segment

    @staticmethod
    def _write(segment: _Segment, view: memoryview, offset: int) -> None:
        while view:
            try:
                written = os.pwrite(segment.fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not segment.direct:
                    raise
                # O_DIRECT accepted at open, refused at write: go through the page cache.
                flags = fcntl.fcntl(segment.fd, fcntl.F_GETFL)
                fcntl.fcntl(segment.fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
                segment.direct = False
                continue
            view = view[written:]
            offset += written

    # -- reading and deleting ---------------------------------------------------------------

    def get(self, locator: str) -> bytes:
        """Read and decrypt the record at *locator*."""
        data = self.get_live(locator, missing_ok=False)
        if data is None:  # not reached: without missing_ok every miss raises
            raise IntegrityError(f"{self._name} item is missing")
        return data

    def get_live(self, locator: str, *, missing_ok: bool = True) -> bytes | None:
        """Read and decrypt the record at *locator*; ``None`` if no live record is there (as
        :meth:`exists` would say), in the same single read. Measured draining a CT burst,
        an :meth:`exists` before :meth:`get` was a second direct read per instance, and it
        took as long as the read of the record (~0.7 ms on this kind of virtual disk)."""
        segment, offset, length = _parse(locator)
        try:
            blob = self._read(segment, offset, _HEADER.size + length)
        except FileNotFoundError as exc:
            if missing_ok:
                return None
            raise SpoolError(f"cannot read {self._name} item: {exc.strerror}") from exc
        except OSError as exc:
            raise SpoolError(f"cannot read {self._name} item: {exc.strerror}") from exc
        if len(blob) < _HEADER.size:
            if missing_ok:
                return None
            raise IntegrityError(f"{self._name} item is missing")
        magic, stored, _, nonce = _HEADER.unpack_from(blob)
        if magic != LIVE or stored != length:
            if missing_ok:
                return None
            raise IntegrityError(f"{self._name} item is missing or has no fednode header")
        if len(blob) != _HEADER.size + length:
            raise IntegrityError(f"{self._name} item is truncated")
        try:
            return self._aead.decrypt(
                nonce, blob[_HEADER.size :], _aad(segment, offset, blob[: _HEADER.size])
            )
        except InvalidTag as exc:
            raise IntegrityError(
                f"{self._name} item failed authentication (wrong key or tampered)"
            ) from exc

    def exists(self, locator: str) -> bool:
        """Whether a live record is at *locator*."""
        segment, offset, length = _parse(locator)
        try:
            header = self._read(segment, offset, _HEADER.size)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SpoolError(f"cannot read {self._name} item: {exc.strerror}") from exc
        if len(header) < _HEADER.size:
            return False
        magic, stored, _, _ = _HEADER.unpack_from(header)
        return bool(magic == LIVE and stored == length)

    def _read(self, segment: str, offset: int, size: int) -> memoryview:
        """Up to *size* bytes of *segment* from *offset* (a multiple of ``DIRECT_ALIGN``), as
        a view of this thread's read buffer, valid until its next read.

        Read with ``O_DIRECT`` where the file system allows it, like the writes: records
        are written past the page cache, so a buffered read would fetch them from disk
        into freshly allocated cache pages (and read ahead into the next records). Measured
        in a worker draining a CT burst, those reads cost about 1 ms of system time per
        0.5 MB instance; a direct read lands in a buffer the thread reuses."""
        fd, direct = self._open_segment(segment, os.O_RDONLY)
        try:
            return self._pread(fd, direct, offset, size)
        finally:
            os.close(fd)

    def _open_segment(self, segment: str, flags: int) -> tuple[int, bool]:
        """Open *segment* for :meth:`_pread`: the descriptor and whether it is ``O_DIRECT``."""
        path = self.root / segment
        if self._direct_reads:
            try:
                return os.open(path, flags | os.O_CLOEXEC | _O_DIRECT), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this file system
                    raise
                self._direct_reads = False
        return os.open(path, flags | os.O_CLOEXEC), False

    def _pread(self, fd: int, direct: bool, offset: int, size: int) -> memoryview:
        if direct:
            buffer: AlignedBuffer | None = getattr(self._scratch, "read", None)
            if buffer is None or size > _KEEP_SCRATCH:
                buffer = AlignedBuffer()
                if size <= _KEEP_SCRATCH:
                    self._scratch.read = buffer
            view = buffer.view(-(-size // DIRECT_ALIGN) * DIRECT_ALIGN)
            try:
                got = os.preadv(fd, [view], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct_reads = False  # refused at read time: go through the page cache
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
            else:
                return view[: min(got, size)]
        return memoryview(os.pread(fd, size, offset))

    def delete(self, locator: str) -> None:
        """Remove the record at *locator* (no error if it is already gone)."""
        self.delete_many([locator])

    def delete_many(self, locators: list[str], *, verified: bool = False) -> None:
        """Remove the records at *locators* (those already gone are skipped).

        Records that lie next to each other in a segment (a burst's, in arrival order) are
        freed by one hole punched over all of them: each punch is a journalled change of the
        file's extents (and, on a file system mounted with ``discard``, a discard), which the
        receive path's own syncs may wait behind.

        Each record's header is read first (a locator must name a record of its length);
        with *verified* the caller has just read every record by :meth:`get`, which
        authenticated its place and length, and the headers are not read again (a direct
        read each, ~0.3 ms: a third of a worker's time per batch after its commit). A
        segment only grows, so punching again over a record deleted meanwhile frees
        nothing else.
        """
        by_segment: dict[str, list[tuple[int, int]]] = {}
        for locator in locators:
            segment, offset, length = _parse(locator)
            by_segment.setdefault(segment, []).append((offset, length))
        for segment, records in by_segment.items():
            try:
                fd, direct = self._open_segment(segment, os.O_RDWR)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SpoolError(f"cannot delete {self._name} item: {exc.strerror}") from exc
            try:
                runs: list[tuple[int, int, list[int]]] = []  # adjacent live records
                for offset, length in sorted(set(records)):
                    if not verified:
                        header = bytes(self._pread(fd, direct, offset, _HEADER.size))
                        if len(header) < _HEADER.size or header[:4] != LIVE:
                            continue  # gone already
                        if _HEADER.unpack(header)[1] != length:
                            raise SpoolError(
                                f"{self._name} locator does not match the record it points at"
                            )
                    end = offset + _extent(length)
                    if runs and runs[-1][1] == offset:
                        runs[-1] = (runs[-1][0], end, [*runs[-1][2], offset])
                    else:
                        runs.append((offset, end, [offset]))
                for start, end, offsets in runs:
                    _discard_range(fd, start, end - start, offsets)
            except OSError as exc:
                raise SpoolError(f"cannot delete {self._name} item: {exc.strerror}") from exc
            finally:
                os.close(fd)

    # -- listing and housekeeping -----------------------------------------------------------

    def names(self) -> list[str]:
        """The locators of every live record."""
        return sorted(r.locator for r in self._records())

    def names_older_than(
        self, seconds: float, *, modified_within: float | None = None
    ) -> list[str]:
        """The locators of live records written more than *seconds* ago; with
        *modified_within*, only those of segments written to in that many seconds."""
        cutoff = time.time() - seconds
        records = self._records(None if modified_within is None
                                else time.time() - modified_within)
        return sorted(r.locator for r in records if r.written_at < cutoff)

    def stats(self) -> SpoolStats:
        count = total = 0
        oldest: float | None = None
        for record in self._records():
            count += 1
            total += record.length
            oldest = record.written_at if oldest is None else min(oldest, record.written_at)
        return SpoolStats(count, total, oldest)

    def remove_empty_segments(self, older_than_seconds: float = 3600) -> int:
        """Remove segments that hold no live record, that no writer holds open and that
        were not modified for *older_than_seconds*; return how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for path in self._segment_paths():
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # another worker removed it
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a writer may still append to it
                if next(_scan(fd, path.name), None) is None:
                    path.unlink(missing_ok=True)
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            fsync_dir(self.root)
        return removed

    def _segment_paths(self) -> list[Path]:
        return sorted(
            Path(entry.path)
            for entry in os.scandir(self.root)
            if entry.name.startswith(SEGMENT_PREFIX)
        )

    def _records(self, modified_since: float | None = None) -> Iterator[_Record]:
        for path in self._segment_paths():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed meanwhile
            try:
                if modified_since is not None and os.fstat(fd).st_mtime < modified_since:
                    continue
                yield from _scan(fd, path.name)
            finally:
                os.close(fd)


# Every Spool of this process, so that a forked child drops the parent's open segments.
_OPEN: weakref.WeakSet[Spool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for spool in list(_OPEN):
        spool._forget_segments()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _scan(fd: int, segment: str) -> Iterator[_Record]:
    """The live records of the open segment *fd*, skipping deleted ones and punched holes."""
    end = os.fstat(fd).st_size
    offset = 0
    while offset + _HEADER.size <= end:
        header = os.pread(fd, _HEADER.size, offset)
        if len(header) < _HEADER.size:
            return
        magic, length, written_at, _ = _HEADER.unpack(header)
        if magic in (LIVE, DEAD):
            if magic == LIVE:
                yield _Record(f"{segment}@{offset}+{length}", length, written_at)
            offset += _extent(length)
            continue
        # A hole (a deleted record) or a record whose write a crash interrupted.
        try:
            found = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only holes up to the end
                return
            raise
        offset = max(offset + DIRECT_ALIGN, found - found % DIRECT_ALIGN)


def record_length(locator: str) -> int:
    """The length of the record *locator* names (its ciphertext bytes)."""
    return _parse(locator)[2]


def _parse(locator: str) -> tuple[str, int, int]:
    match = _LOCATOR.match(locator)
    if match is None or int(match[2]) % DIRECT_ALIGN:
        raise SpoolError("invalid spool locator")
    return match[1], int(match[2]), int(match[3])


def _aad(segment: str, offset: int, header: bytes | memoryview) -> bytes:
    return f"{segment}@{offset}".encode() + bytes(header[:_AAD_HEADER])


_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def _discard_range(fd: int, offset: int, length: int, records: list[int]) -> None:
    """Free the blocks of the adjacent records at *records* (offsets), which span *length*
    bytes from *offset* (one punched hole); where the file system cannot punch holes, mark
    each record dead."""
    if _fallocate is not None:
        if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(code, os.strerror(code))
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & _O_DIRECT:  # a magic's few bytes are not a direct write
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~_O_DIRECT)
    for record in records:
        os.pwrite(fd, DEAD, record)
