"""The outbox: SRs encrypted at rest, authenticated by name, durable and deletable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from storage.errors import IntegrityError, StorageError
from storage.outbox import Outbox


def test_items_are_encrypted_and_round_trip(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", os.urandom(32))
    secret = b"DICM...PATIENT^NAME^OF^SOMEONE..."
    box.put("report-1", secret)
    raw = (tmp_path / "outbox" / "report-1.sr").read_bytes()
    assert b"PATIENT^NAME" not in raw
    assert (tmp_path / "outbox" / "report-1.sr").stat().st_mode & 0o077 == 0
    assert box.get("report-1") == secret
    assert set(box.names()) == {"report-1"}
    assert box.stats().count == 1
    assert box.delete("report-1") and not box.exists("report-1")
    assert not box.delete("report-1")


def test_a_renamed_item_or_another_key_fails_authentication(tmp_path: Path) -> None:
    key = os.urandom(32)
    box = Outbox(tmp_path, key)
    box.put("report-1", b"one")
    os.replace(tmp_path / "report-1.sr", tmp_path / "report-2.sr")
    with pytest.raises(IntegrityError):
        box.get("report-2")
    box.put("report-3", b"three")
    with pytest.raises(IntegrityError):
        Outbox(tmp_path, os.urandom(32)).get("report-3")
    with pytest.raises(StorageError, match="missing"):
        box.get("report-9")
    with pytest.raises(StorageError, match="invalid"):
        box.path("../etc/passwd")


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    box = Outbox(tmp_path, os.urandom(32))
    stale = tmp_path / ".report-1.sr.123.tmp"
    stale.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = tmp_path / ".report-2.sr.123.tmp"
    fresh.write_bytes(b"partial")
    assert box.remove_stale_temporaries(3600) == 1
    assert not stale.exists() and fresh.exists()
