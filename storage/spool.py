"""The encrypted spool: raw received bytes, AES-256-GCM, until de-identification.

Each item is ``nonce (12 bytes) || ciphertext || tag``; the item's name is the associated data,
so a file renamed onto another item's name fails authentication instead of decrypting.

Items are encrypted into a per-thread, page-aligned scratch buffer reused from one item to the
next and written with ``O_DIRECT`` where the file system allows it
(:func:`~storage.files.atomic_write_aligned`): at the receive rate, fresh buffers and page
cache growth cost more CPU than the encryption.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import IntegrityError, SpoolError
from storage.files import AlignedBuffer, atomic_write_aligned, fsync_dir

logger = logging.getLogger(__name__)

NONCE_BYTES = 12
MAGIC = b"FNSP1"
_HEADER = len(MAGIC) + NONCE_BYTES
_TAG_BYTES = 16
# Scratch buffers above this size are not kept for the next item.
_KEEP_SCRATCH = 64 << 20


@dataclass(frozen=True)
class SpoolStats:
    count: int
    total_bytes: int
    oldest_mtime: float | None


class Spool:
    """Encrypted, durable storage of received bytes, keyed by an opaque item name."""

    def __init__(self, root: Path, key: bytes) -> None:
        self.root = root
        self._aead = AESGCM(key)
        self._scratch = threading.local()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise SpoolError("invalid spool item name")
        return self.root / name

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, sync_dir: bool = True
    ) -> int:
        """Encrypt *data* and store it durably under *name*; return the bytes written.

        With ``sync_dir=False`` the item's bytes are durable on return but its name only
        after :meth:`sync` (so that one folder fsync can cover several items).
        """
        nonce = os.urandom(NONCE_BYTES)
        size = _HEADER + len(data) + _TAG_BYTES
        scratch: AlignedBuffer | None = getattr(self._scratch, "buffer", None)
        keep = size <= _KEEP_SCRATCH
        if scratch is None or not keep:
            scratch = AlignedBuffer()
            if keep:
                self._scratch.buffer = scratch
        try:
            blob = scratch.view(size)
            blob[: len(MAGIC)] = MAGIC
            blob[len(MAGIC) : _HEADER] = nonce
            aad = name.encode()
            if hasattr(self._aead, "encrypt_into"):  # cryptography >= 46
                self._aead.encrypt_into(nonce, data, aad, blob[_HEADER:])
            else:
                blob[_HEADER:] = self._aead.encrypt(nonce, bytes(data), aad)
            del blob
            atomic_write_aligned(self.path(name), scratch, size, sync_dir=sync_dir)
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc.strerror}") from exc
        return size

    def sync(self) -> None:
        """Make the names of items written with ``put(sync_dir=False)`` durable."""
        try:
            fsync_dir(self.root)
        except OSError as exc:
            raise SpoolError(f"cannot sync the spool: {exc.strerror}") from exc

    def get(self, name: str) -> bytes:
        """Read and decrypt item *name*."""
        try:
            blob = self.path(name).read_bytes()
        except OSError as exc:
            raise SpoolError(f"cannot read spool item: {exc.strerror}") from exc
        if not blob.startswith(MAGIC):
            raise IntegrityError("spool item has no fednode header")
        nonce = blob[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES :], name.encode())
        except InvalidTag as exc:
            raise IntegrityError(
                "spool item failed authentication (wrong key or tampered)"
            ) from exc

    def delete(self, name: str) -> None:
        """Remove item *name* (no error if it is already gone)."""
        try:
            self.path(name).unlink(missing_ok=True)
            fsync_dir(self.root)
        except OSError as exc:
            raise SpoolError(f"cannot delete spool item: {exc.strerror}") from exc

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith("."))

    def names_older_than(self, seconds: float) -> list[str]:
        """Items last written more than *seconds* ago."""
        cutoff = time.time() - seconds
        return sorted(
            entry.name
            for entry, st in self._entries()
            if not entry.name.startswith(".") and st.st_mtime < cutoff
        )

    def _entries(self) -> Iterator[tuple[os.DirEntry[str], os.stat_result]]:
        """The folder's entries with their ``stat``, skipping those removed meanwhile (the
        SCPs rename, the workers delete, all the time)."""
        for entry in os.scandir(self.root):
            try:
                yield entry, entry.stat()
            except FileNotFoundError:
                continue

    def stats(self) -> SpoolStats:
        count = total = 0
        oldest: float | None = None
        for entry, st in self._entries():
            if entry.name.startswith("."):
                continue
            count += 1
            total += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        return SpoolStats(count, total, oldest)

    def remove_stale_tmp(self, older_than_seconds: float = 3600) -> int:
        """Remove temporary files left by a crash mid-write; return how many."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for entry, st in self._entries():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and st.st_mtime < cutoff:
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue  # another worker's sweep removed it first
                removed += 1
        return removed
