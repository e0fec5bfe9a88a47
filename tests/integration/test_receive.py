"""Durable receipt (node.dicom.receive.Receiver) against real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from node.audit import FALLBACK_NAME
from node.deid.pseudonyms import uid_pseudonym
from node.dicom.receive import Receiver
from node.dicom.status import Status
from node.keys import NodeKeys
from storage.db import Database
from storage.models import AuditEvent, Instance, JobRow
from storage.queue import SqlQueue
from storage.spool import Spool
from tests.support.dicomgen import FakeStudy, ct_instance
from tests.support.node import free_port

KEYS = NodeKeys.from_master(os.urandom(32))


def encode(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def make_receiver(db: Database, tmp_path: Path, floor: int = 0) -> Receiver:
    return Receiver(
        db=db,
        queue=SqlQueue(db),
        spool=Spool(tmp_path / "spool", KEYS.spool),
        site_key=KEYS.site,
        data_dir=tmp_path,
        free_space_floor_bytes=floor,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Iterator[Database]:
    yield request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")


@pytest.fixture
def ct() -> Dataset:
    return ct_instance(FakeStudy(), generate_uid(), 1, 0, size=32)


def store(rx: Receiver, ds: Dataset, raw: bytes | None = None, **over: str) -> Status:
    kwargs = {
        "transfer_syntax": ExplicitVRLittleEndian,
        "sop_class_uid": ds.SOPClassUID,
        "sop_instance_uid": ds.SOPInstanceUID,
        "calling_ae": "STORESCU",
    }
    kwargs.update(over)
    return rx.store(encode(ds) if raw is None else raw, **kwargs).status


def counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(Instance)) or 0,
            s.scalar(select(func.count()).select_from(JobRow)) or 0,
        )


def test_store_keeps_encrypted_bytes_row_and_job(db: Database, tmp_path: Path, ct: Dataset) -> None:
    rx = make_receiver(db, tmp_path)
    raw = encode(ct)
    assert store(rx, ct) is Status.SUCCESS
    with db.session() as s:
        row = s.execute(select(Instance)).scalar_one()
        job = s.execute(select(JobRow)).scalar_one()
    assert row.sop_key == uid_pseudonym(KEYS.site, ct.SOPInstanceUID)
    assert row.study_key == uid_pseudonym(KEYS.site, ct.StudyInstanceUID)
    assert row.state == "received" and row.size_bytes == len(raw)
    assert job.kind == "deidentify" and job.payload == {"instance_id": row.id}
    assert row.spool_name is not None
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "spool").iterdir())
    assert b"DOE^JANE" not in on_disk and ct.SOPInstanceUID.encode() not in on_disk
    assert rx.spool.get(row.spool_name) == raw
    # No original identifier in any column.
    assert ct.SOPInstanceUID not in json.dumps([row.sop_key, row.study_key, row.series_key])


def test_resend_is_idempotent(db: Database, tmp_path: Path, ct: Dataset) -> None:
    rx = make_receiver(db, tmp_path)
    assert store(rx, ct) is Status.SUCCESS
    assert store(rx, ct) is Status.SUCCESS
    assert counts(db) == (1, 1)
    assert len(rx.spool.names()) == 1


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        ({"sop_instance_uid": "1.2.3.4"}, Status.CANNOT_UNDERSTAND_UID_MISMATCH),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS),
    ],
)
def test_request_mismatch_refused(
    db: Database, tmp_path: Path, ct: Dataset, mutate: dict[str, str], expected: Status
) -> None:
    rx = make_receiver(db, tmp_path)
    assert store(rx, ct, **mutate) is expected
    assert counts(db) == (0, 0) and rx.spool.names() == []
    with db.session() as s:
        audit = s.execute(select(AuditEvent)).scalar_one()
    assert audit.event == "store-failed" and audit.detail["status"] == f"0x{expected:04X}"


def test_garbage_truncated_and_missing_uid(db: Database, tmp_path: Path, ct: Dataset) -> None:
    rx = make_receiver(db, tmp_path)
    assert store(rx, ct, raw=os.urandom(3000)) in (
        Status.CANNOT_UNDERSTAND, Status.CANNOT_UNDERSTAND_MISSING_UID
    )
    assert store(rx, ct, raw=encode(ct)[:-11]) is Status.CANNOT_UNDERSTAND
    del ct.StudyInstanceUID
    assert store(rx, ct) is Status.CANNOT_UNDERSTAND_MISSING_UID
    assert counts(db) == (0, 0) and rx.spool.names() == []


def test_free_space_floor_refuses(db: Database, tmp_path: Path, ct: Dataset) -> None:
    rx = make_receiver(db, tmp_path, floor=2**62)
    assert store(rx, ct) is Status.OUT_OF_RESOURCES
    assert counts(db) == (0, 0) and rx.spool.names() == []


def test_database_down_refuses_and_leaves_nothing(tmp_path: Path, ct: Dataset) -> None:
    down = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test")
    rx = make_receiver(down, tmp_path)
    assert store(rx, ct) is Status.OUT_OF_RESOURCES
    assert rx.spool.names() == []
    lines = (tmp_path / FALLBACK_NAME).read_text().splitlines()
    record = json.loads(lines[-1])
    assert record["event"] == "store-failed" and record["detail"]["status"] == "0xA700"
    assert "DOE" not in lines[-1]


def test_commit_with_unknown_outcome_keeps_the_record_for_the_resend(
    db: Database, tmp_path: Path, ct: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection fails while committing, after the commit landed (PostgreSQL losing the
    connection during COMMIT): the store is refused, but its record must stay, because the
    peer's re-send is acknowledged as a duplicate of the row that names it."""
    rx = make_receiver(db, tmp_path)
    dialect = type(db.engine.dialect)
    real_commit = dialect.do_commit

    def commit_then_fail(self: object, dbapi_connection: object) -> None:
        real_commit(self, dbapi_connection)  # type: ignore[arg-type]
        raise db.engine.dialect.loaded_dbapi.OperationalError("connection lost during COMMIT")

    with monkeypatch.context() as m:
        m.setattr(dialect, "do_commit", commit_then_fail)
        assert store(rx, ct) is Status.OUT_OF_RESOURCES
    assert counts(db) == (1, 1)  # it landed after all
    assert store(rx, ct) is Status.SUCCESS  # the re-send: a duplicate of that row
    assert counts(db) == (1, 1)
    with db.session() as s:
        row = s.execute(select(Instance)).scalar_one()
    assert row.spool_name is not None and rx.spool.get(row.spool_name) == encode(ct)
    assert rx.spool.names() == [row.spool_name]  # the re-send's own record was discarded

