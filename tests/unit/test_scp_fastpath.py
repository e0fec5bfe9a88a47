"""The SCP's fast C-STORE path and the receive path's group commit.

The fast path (node.dicom.fastpath._StoreDUL) answers C-STOREs without pynetdicom's DIMSE layer,
so these tests hold it to pynetdicom: the same response bytes, the same statuses through a
real pynetdicom SCU on loopback, fragmented PDUs, and pynetdicom's own path still serving
what the fast path leaves to it (C-ECHO, everything with the fast path switched off).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

import node.dicom.fastpath as fastpath_module
from node.config import load_settings
from node.deid.pseudonyms import uid_pseudonym
from node.dicom.fastpath import StoreRequest, encode_store_rsp, pdata_pdus
from node.dicom.receive import MAX_BATCH, Receiver, _GroupCommitter
from node.dicom.scp import StorageSCP
from node.dicom.sockets import listen_socket
from node.dicom.status import Status
from node.keys import NodeKeys
from storage.db import Database
from storage.errors import DatabaseUnavailable
from storage.models import Instance, JobRow
from storage.queue import SqlQueue
from storage.spool import Spool
from tests.support.dicomgen import FakeStudy, ct_instance
from tests.support.node import free_port

KEYS = NodeKeys.from_master(os.urandom(32))


def ct(study: FakeStudy, index: int, size: int) -> Dataset:
    ds = ct_instance(study, generate_uid(), 1, index, size=size)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encode(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


# -- response encoding ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "comment"),
    [(0x0000, ""), (0xA700, "data volume below free-space floor"), (0xC000, "odd")],
)
def test_store_rsp_is_byte_for_byte_what_pynetdicom_sends(status: int, comment: str) -> None:
    req = StoreRequest(1, ExplicitVRLittleEndian, 7, CTImageStorage, "1.2.3.4.55")
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4.55"
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (p_data,) = list(msg.encode_msg(1, 0))
    ((context_id, pynetdicom_bytes),) = p_data.presentation_data_value_list
    assert context_id == 1
    assert pynetdicom_bytes[0] == 0x03  # command, last fragment
    assert encode_store_rsp(req, status, comment) == pynetdicom_bytes[1:]


def test_store_rsp_fragments_to_the_peers_maximum_pdu() -> None:
    req = StoreRequest(3, ExplicitVRLittleEndian, 1, CTImageStorage, "1.2.3")
    command = encode_store_rsp(req, 0xA700, "x" * 60)
    pdus = pdata_pdus(3, command, 40)
    assert len(pdus) > 1
    reassembled = b""
    for i, raw in enumerate(pdus):
        pdu = P_DATA_TF()
        pdu.decode(raw)
        assert len(raw) - 6 <= 40
        (item,) = pdu.presentation_data_value_items
        context_id, data = item.presentation_context_id, item.presentation_data_value
        assert context_id == 3
        assert data[0] == (0x03 if i == len(pdus) - 1 else 0x01)
        reassembled += data[1:]
    assert reassembled == command
    assert pdata_pdus(3, command, 0) == [b"".join(pdata_pdus(3, command, 0))]


# -- a real SCP on loopback ---------------------------------------------------------------------
@dataclass
class Running:
    scp: StorageSCP
    port: int
    db: Database
    receiver: Receiver
    fast_calls: list[str]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "fednode.toml"
    config.write_text(
        f'[node]\nae_title = "FEDNODE"\ndata_dir = "{data}"\n'
        f'[dicom]\nhost = "127.0.0.1"\nport = {port}\nmax_pdu = 16384\n'
        "free_space_floor_mb = 0\n"
        '[[dicom.peers]]\nae_title = "SCU"\n'
    )
    settings = load_settings(config)
    db = Database(f"sqlite:///{data / 'fednode.db'}")
    db.upgrade()
    receiver = Receiver(
        db=db,
        queue=SqlQueue(db),
        spool=Spool(data / "spool", KEYS.spool),
        site_key=KEYS.site,
        data_dir=data,
        free_space_floor_bytes=0,
    )
    scp = StorageSCP(settings, receiver)
    calls: list[str] = []
    fast = scp.store_fast

    def spy(assoc: Any, request: StoreRequest, raw: memoryview) -> tuple[int, str]:
        calls.append(request.sop_instance_uid)
        return fast(assoc, request, raw)

    scp.store_fast = spy  # type: ignore[method-assign]
    sock = listen_socket("127.0.0.1", port)
    thread = threading.Thread(target=scp.serve, args=(sock,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while scp.server is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield Running(scp, port, db, receiver, calls)
    finally:
        scp.stop(5)
        sock.close()
        db.dispose()


def scu(max_pdu: int = 16384) -> AE:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = max_pdu
    return ae


def counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (
            s.scalar(select(func.count()).select_from(Instance)) or 0,
            s.scalar(select(func.count()).select_from(JobRow)) or 0,
        )


def test_fast_path_stores_fragmented_instances_and_echo_still_works(running: Running) -> None:
    study = FakeStudy()
    sent = [ct(study, i, 96) for i in range(3)]  # > 16 KiB each
    assoc = scu(max_pdu=4096).associate("127.0.0.1", running.port, ae_title="FEDNODE")
    assert assoc.is_established
    try:
        for ds in sent:
            status = assoc.send_c_store(ds)
            assert status.Status == Status.SUCCESS
            assert assoc.send_c_echo().Status == Status.SUCCESS  # pynetdicom's path
        assert assoc.send_c_store(sent[0]).Status == Status.SUCCESS  # re-send: idempotent
    finally:
        assoc.release()
    assert running.fast_calls == [ds.SOPInstanceUID for ds in sent] + [sent[0].SOPInstanceUID]
    assert counts(running.db) == (3, 3)
    with running.db.session() as s:
        rows = {r.sop_key: r.spool_name for r in s.execute(select(Instance)).scalars()}
    for ds in sent:
        name = rows[uid_pseudonym(KEYS.site, ds.SOPInstanceUID)]
        assert running.receiver.spool.get(name) == encode(ds)  # the exact bytes sent


def test_fast_path_answers_refusals_with_status_and_comment(running: Running) -> None:
    ds = ct(FakeStudy(), 0, 16)
    del ds.StudyInstanceUID
    assoc = scu().associate("127.0.0.1", running.port, ae_title="FEDNODE")
    try:
        rsp = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert rsp.Status == Status.CANNOT_UNDERSTAND_MISSING_UID
    assert "StudyInstanceUID" in rsp.ErrorComment
    assert running.fast_calls == [ds.SOPInstanceUID]
    assert counts(running.db) == (0, 0)


def test_pynetdicom_path_when_fast_path_is_off(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastpath_module, "FAST_STORE_PATH", False)
    ds = ct(FakeStudy(), 0, 96)
    assoc = scu(max_pdu=4096).associate("127.0.0.1", running.port, ae_title="FEDNODE")
    try:
        assert assoc.send_c_store(ds).Status == Status.SUCCESS
        assert assoc.send_c_echo().Status == Status.SUCCESS
    finally:
        assoc.release()
    assert running.fast_calls == []
    assert counts(running.db) == (1, 1)


def test_concurrent_associations_each_get_their_answers(running: Running) -> None:
    study = FakeStudy()
    errors: list[str] = []

    def send(n: int) -> None:
        assoc = scu().associate("127.0.0.1", running.port, ae_title="FEDNODE")
        try:
            for i in range(n):
                ds = ct(study, i, 32)
                if assoc.send_c_store(ds).Status != Status.SUCCESS:
                    errors.append(ds.SOPInstanceUID)
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(15,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert counts(running.db) == (60, 60)


# -- group commit -------------------------------------------------------------------------------
def _committer(write: Any) -> _GroupCommitter:
    from contextlib import nullcontext

    return _GroupCommitter(write, nullcontext)


def test_group_commit_batches_concurrent_rows_and_answers_each() -> None:
    batches: list[list[int]] = []

    def write(rows: list[dict[str, Any]]) -> list[int | None]:
        batches.append([r["n"] for r in rows])
        time.sleep(0.01)  # a commit: others arrive meanwhile
        return [r["n"] * 10 for r in rows]

    committer = _committer(write)
    results: dict[int, int | None] = {}

    def one(n: int) -> None:
        results[n] = committer.write({"n": n})

    threads = [threading.Thread(target=one, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {n: n * 10 for n in range(40)}
    assert sorted(n for b in batches for n in b) == list(range(40))
    assert max(len(b) for b in batches) > 1  # rows did share transactions
    assert all(len(b) <= MAX_BATCH for b in batches)


def test_group_commit_isolates_a_failing_row_and_fails_all_when_db_is_down() -> None:
    def write(rows: list[dict[str, Any]]) -> list[int | None]:
        if any(r["n"] == 3 for r in rows):
            raise ValueError("bad row")
        if any(r["n"] == 99 for r in rows):
            raise DatabaseUnavailable()
        time.sleep(0.005)
        return [r["n"] for r in rows]

    committer = _committer(write)
    outcome: dict[int, object] = {}

    def one(n: int) -> None:
        try:
            outcome[n] = committer.write({"n": n})
        except Exception as exc:
            outcome[n] = type(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcome == {n: (ValueError if n == 3 else n) for n in range(8)}
    with pytest.raises(DatabaseUnavailable):
        committer.write({"n": 99})


def test_uid_conversion_cache_keeps_validation_and_skips_instance_uids() -> None:
    import pynetdicom.pdu_primitives

    set_uid = pynetdicom.pdu_primitives.set_uid
    assert getattr(set_uid, "_fednode_cached", False)
    syntax = set_uid("1.2.840.10008.1.2.1", "Transfer Syntax UID")
    assert syntax == "1.2.840.10008.1.2.1"
    assert set_uid("1.2.840.10008.1.2.1", "Transfer Syntax UID") is syntax  # cached
    instance = "1.2.826.0.1.3680043.8.498.1"
    assert set_uid(instance, "Affected SOP Instance UID") == instance
    assert set_uid(instance, "Affected SOP Instance UID") is not set_uid(
        instance, "Affected SOP Instance UID"
    )  # never cached: a fresh UID object each time
    for _ in range(2):  # an invalid UID raises every time (exceptions are not cached)
        with pytest.raises(ValueError):
            set_uid("1" * 70, "Transfer Syntax UID")


def test_pynetdicom_log_records_lose_uids_and_ours_are_untouched() -> None:
    from node.logs import RedactLibraryIdentifiers

    redact = RedactLibraryIdentifiers()
    record = logging.LogRecord(
        "pynetdicom.utils", logging.WARNING, __file__, 1,
        "Non-conformant '%s' value '%s'", ("Affected SOP Instance UID", "1.2.826.0.1.99.7"),
        None,
    )
    assert redact.filter(record)
    assert record.getMessage() == "Non-conformant 'Affected SOP Instance UID' value '<uid>'"
    ours = logging.LogRecord(
        "node.pipeline.deidentify", logging.INFO, __file__, 1, "study %s", ("2.25.1234567",), None
    )
    assert redact.filter(ours) and ours.getMessage() == "study 2.25.1234567"
