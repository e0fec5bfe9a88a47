"""The outbox: re-identified Structured Reports, encrypted at rest, until the PACS has them.

An SR carries the original patient and study (it must, to be filed under them), so it is PHI
and lives only here (design: "the PHI boundary"): one file per report under the node's
``outbox`` folder, AES-256-GCM under the node's outbox key (derived from the master secret,
:attr:`node.keys.NodeKeys.outbox`), written atomically and durably (tmp + fsync + rename +
fsync of the folder). A file is ``nonce (12 bytes) || ciphertext || tag`` with the file's name
as associated data, so a file renamed onto another report's name fails authentication.

It is deliberately not the receive spool: the spool's orphan sweep deletes every record that no
instance row names, and its records are deleted right after de-identification. The outbox's
files are named by their report (``report-<id>``) and deleted by the export stage after every
destination acknowledged the SR and the retention period has passed.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from storage.errors import IntegrityError, StorageError
from storage.files import atomic_write, fsync_dir
from storage.sealing import seal, unseal

SUFFIX = ".sr"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class OutboxStats:
    count: int
    total_bytes: int
    oldest_written_at: float | None


class Outbox:
    """Encrypted files by name under *root* (see the module docstring)."""

    def __init__(self, root: Path, key: bytes) -> None:
        if len(key) != 32:
            raise StorageError("the outbox key must be 32 bytes")
        self.root = root
        self._key = key
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise StorageError("invalid outbox name")
        return self.root / f"{name}{SUFFIX}"

    def put(self, name: str, data: bytes) -> int:
        """Encrypt and store *data* as *name* (replacing an earlier file); return its size."""
        path = self.path(name)
        blob = seal(self._key, name, data)
        try:
            atomic_write(path, blob, mode=0o600)
        except OSError as exc:
            raise StorageError(f"cannot write outbox item {name}: {exc.strerror}") from exc
        return len(blob)

    def get(self, name: str) -> bytes:
        """The decrypted bytes of *name*."""
        try:
            blob = self.path(name).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"outbox item {name} is missing") from exc
        except OSError as exc:
            raise StorageError(f"cannot read outbox item {name}: {exc.strerror}") from exc
        try:
            return unseal(self._key, name, blob)
        except IntegrityError as exc:
            raise IntegrityError(
                f"outbox item {name} failed authentication (wrong key or tampered)"
            ) from exc

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def delete(self, name: str) -> bool:
        """Delete *name*; ``False`` if it was not there."""
        path = self.path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete outbox item {name}: {exc.strerror}") from exc
        fsync_dir(self.root)
        return True

    def names(self) -> dict[str, float]:
        """Every item's name and modification time (files vanishing meanwhile are skipped)."""
        out: dict[str, float] = {}
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                out[path.name[: -len(SUFFIX)]] = path.stat().st_mtime
            except FileNotFoundError:
                continue
        return out

    def remove_stale_temporaries(self, older_than_seconds: float = 3600) -> int:
        """Delete temporary files left by a kill in the middle of :meth:`put`."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.root.glob(".*.tmp"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def stats(self) -> OutboxStats:
        count = total = 0
        oldest: float | None = None
        for path in self.root.glob(f"*{SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            count += 1
            total += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        return OutboxStats(count, total, oldest)
