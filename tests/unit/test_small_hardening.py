"""The smaller items of issue 18: file modes, URL masking, audit fallback, AE titles in logs."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from node import audit as audit_module
from node.config import redact_url
from node.dicom.scp import ae_title_text
from storage.audit import AuditKind
from storage.db import Database
from storage.errors import DatabaseUnavailable


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_database_and_wal_are_created_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "data" / "fednode.db"
        db = Database(f"sqlite:///{path}")
        with db.transaction() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        wal, shm = path.with_name("fednode.db-wal"), path.with_name("fednode.db-shm")
        assert wal.exists() and shm.exists()  # the connection is still open
        assert [_mode(p) for p in (path, wal, shm)] == [0o600, 0o600, 0o600]
        db.dispose()
        # An existing database created world-readable is tightened when it is opened.
        os.chmod(path, 0o644)
        Database(f"sqlite:///{path}").dispose()
        assert _mode(path) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://fednode:s3cret@db/fednode", "postgresql+psycopg://fednode:***@db/fednode"),
        ("postgresql+psycopg://fednode@db/fednode?password=s3cret&sslmode=require",
         "postgresql+psycopg://fednode@db/fednode?password=***&sslmode=require"),
        ("postgresql+psycopg://db/fednode?sslmode=require&PASSWORD=s3cret",
         "postgresql+psycopg://db/fednode?sslmode=require&PASSWORD=***"),
        ("postgresql+psycopg://db/fednode?sslpassword=s3cret", "postgresql+psycopg://db/fednode?sslpassword=***"),
    ],
)
def test_config_show_masks_passwords_in_urls(url: str, shown: str) -> None:
    assert redact_url(url) == shown and "s3cret" not in redact_url(url)


def test_audit_record_survives_a_full_data_volume_in_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class DownDatabase:
        pass

    def db_down(*args: object, **kwargs: object) -> None:
        raise DatabaseUnavailable("database sqlite unavailable: OperationalError")

    def disk_full(fd: int, data: bytes) -> int:  # ENOSPC cannot be produced on demand here
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(audit_module, "record", db_down)
    monkeypatch.setattr(audit_module.os, "write", disk_full)
    with caplog.at_level(logging.ERROR, logger="node.audit"):
        audit_module.audit(
            DownDatabase(),  # type: ignore[arg-type]
            tmp_path, AuditKind.STORE_FAILED, outcome="failure", actor="PACS",
            status="0xA700", reason="database unavailable",
        )
    [rec] = [r for r in caplog.records if r.name == "node.audit"]
    assert "audit record kept in the log only" in rec.getMessage()
    kept = rec.audit  # type: ignore[attr-defined]
    assert kept["event"] == "store-failed" and kept["actor"] == "PACS"
    assert kept["detail"] == {"status": "0xA700", "reason": "database unavailable"}
    assert json.loads(rec.getMessage().split(": ", 2)[2]) == kept


def test_ae_titles_are_logged_as_one_printable_line() -> None:
    assert ae_title_text("EVIL\nFORGED LOG") == "EVIL?FORGED LOG"
    assert ae_title_text(b"PACS\r\n\x00  ") == "PACS"
    assert ae_title_text("A" * 40) == "A" * 16
    assert ae_title_text(None) == ""
