"""``fednode serve`` as a subprocess, driven by real DICOM peers (DCMTK, pynetdicom) on loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from node.deid.pseudonyms import uid_pseudonym
from storage.db import Database
from storage.models import AuditEvent, Instance, JobRow
from storage.spool import Spool
from tests.support.dicomgen import FakeStudy, ct_instance, write, write_ct_study
from tests.support.node import (
    DCMTK_ENV,
    NodeDir,
    RunningNode,
    dcmtk,
    free_port,
    init_node,
    run_cli,
)

pytestmark = pytest.mark.dcmtk


def storescu(
    node: NodeDir,
    *paths: Path,
    aet: str = "STORESCU",
    aec: str | None = None,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            "-aet",
            aet,
            "-aec",
            aec or node.ae_title,
            *extra,
            "+sd",
            "+r",
            "127.0.0.1",
            str(node.port),
            *map(str, paths),
        ],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def db_of(node: NodeDir) -> Database:
    return Database(node.settings().database_url)


def instance_keys(node: NodeDir) -> list[str]:
    db = db_of(node)
    with db.session() as s:
        keys = list(s.execute(select(Instance.sop_key)).scalars())
    db.dispose()
    return keys


@pytest.fixture
def node(tmp_path: Path) -> NodeDir:
    return init_node(tmp_path / "node")


def test_storescu_study_is_kept_encrypted_and_queued(node: NodeDir, tmp_path: Path) -> None:
    study = FakeStudy()
    paths = write_ct_study(tmp_path / "study", series=3, per_series=5, size=64, study=study)
    uids = [ct_uid(p) for p in paths]
    with RunningNode(node) as running:
        result = storescu(node, tmp_path / "study")
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("Received Store Response (Success)") == len(paths)
        assert running.stop() == 0
    keys = node.keys()
    assert sorted(instance_keys(node)) == sorted(uid_pseudonym(keys.site, u) for u in uids)
    db = db_of(node)
    with db.session() as s:
        rows = list(s.execute(select(Instance)).scalars())
        jobs = list(s.execute(select(JobRow)).scalars())
    assert {r.state for r in rows} == {"received"}
    assert len({r.series_key for r in rows}) == 3 and len({r.study_key for r in rows}) == 1
    assert sorted(j.payload["instance_id"] for j in jobs) == sorted(r.id for r in rows)
    spool = Spool(node.settings().spool_dir, keys.spool)
    assert sorted(r.spool_name for r in rows) == spool.names()
    on_disk = b"".join(p.read_bytes() for p in node.settings().spool_dir.iterdir())
    assert b"DOE^JANE" not in on_disk and study.patient.patient_id.encode() not in on_disk
    for row in rows:
        assert row.spool_name is not None
        assert b"DOE^JANE" in spool.get(row.spool_name)  # the node itself can read it back
    # Nothing identifying reached the log.
    assert (
        "DOE" not in running.log.read_text()
        and study.patient.patient_id not in running.log.read_text()
    )


def ct_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu_stream(node: NodeDir, folder: Path) -> subprocess.Popen[str]:
    """DCMTK storescu sending *folder*, its verbose log readable line by line."""
    return subprocess.Popen(
        [dcmtk("storescu"), "-v", "-aet", "STORESCU", "-aec", node.ae_title, "+sd", "+r",
         "127.0.0.1", str(node.port), str(folder)],
        env=DCMTK_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def acknowledged_files(proc: subprocess.Popen[str]) -> Iterator[str]:
    """Each file storescu reports stored with status 0x0000, as soon as it reports it."""
    current: str | None = None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if m := re.match(r"I: Sending file: (.+)$", line.strip()):
                current = m.group(1)
            elif "Received Store Response (Success)" in line and current:
                yield current
    finally:
        proc.stdout.close()


def test_crash_safety_sigkill_mid_stream(node: NodeDir, tmp_path: Path) -> None:
    paths = write_ct_study(tmp_path / "many", series=3, per_series=100, size=256)
    uid_of = {str(p): ct_uid(p) for p in paths}
    running = RunningNode(node)
    proc = storescu_stream(node, tmp_path / "many")
    acknowledged: list[str] = []
    killed = False
    for path in acknowledged_files(proc):
        acknowledged.append(uid_of[path])
        if len(acknowledged) == 60 and not killed:
            running.kill()  # SIGKILL the supervisor mid-stream; children die with it
            killed = True
    proc.wait(60)
    assert killed and 60 <= len(acknowledged) < len(paths)
    time.sleep(0.5)
    with socket.socket() as s:  # no orphan child kept the port
        assert s.connect_ex(("127.0.0.1", node.port)) != 0
    with RunningNode(node) as again:  # restart: the database and spool are consistent
        assert again.stop() == 0
    keys = node.keys()
    db = db_of(node)
    with db.session() as s:
        rows = {r.sop_key: r for r in s.execute(select(Instance)).scalars()}
        jobs = list(s.execute(select(JobRow)).scalars())
    per_instance: dict[int, int] = {}
    for j in jobs:
        per_instance[j.payload["instance_id"]] = per_instance.get(j.payload["instance_id"], 0) + 1
    spool = Spool(node.settings().spool_dir, keys.spool)
    for uid in acknowledged:
        row = rows.get(uid_pseudonym(keys.site, uid))
        assert row is not None, "an acknowledged instance was lost"
        assert per_instance.get(row.id) == 1, "queued exactly once"
        assert row.spool_name and spool.get(row.spool_name)
    # Anything kept beyond the acknowledged ones is whole too (stored, not yet answered).
    for row in rows.values():
        assert row.spool_name and spool.get(row.spool_name)


def test_unknown_calling_ae_and_wrong_called_ae_are_rejected(node: NodeDir) -> None:
    with RunningNode(node) as running:
        ok = subprocess.run(
            [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "FEDNODE", "127.0.0.1", str(node.port)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        unknown = subprocess.run(
            [dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "FEDNODE", "127.0.0.1", str(node.port)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr
        wrong = subprocess.run(
            [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "NOTME", "127.0.0.1", str(node.port)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr
        # STORESCU is pinned to 127.0.0.1; from another loopback address it is refused.
        pinned = AE(ae_title="STORESCU")
        pinned.add_requested_context("1.2.840.10008.1.1")
        assoc = pinned.associate(
            "127.0.0.1", node.port, ae_title="FEDNODE", bind_address=("127.0.0.2", 0)
        )
        assert assoc.is_rejected
        assert running.stop() == 0
    db = db_of(node)
    with db.session() as s:
        events = list(
            s.execute(
                select(AuditEvent).where(AuditEvent.event == "association-rejected")
            ).scalars()
        )
    assert {e.actor for e in events} == {"INTRUDER", "ECHOSCU", "STORESCU"}
    assert {e.detail["reason"] for e in events} == {
        "calling AE title or host not allowed",
        "called AE title not recognised",
    }


def _raw_file(path: Path, body: bytes, sop_uid: str) -> Path:
    """A Part 10 file whose File Meta is valid and whose dataset bytes are *body*."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def test_bad_datasets_get_failure_statuses_and_nothing_is_kept(
    node: NodeDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import _config

    # Send each file's dataset bytes exactly as they are on disk (no decode, no re-encode).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds = ct_instance(FakeStudy(), generate_uid(), 1, 0, size=32)
    enc = DicomBytesIO()
    enc.is_little_endian, enc.is_implicit_VR = True, False
    write_dataset(enc, ds)
    body = enc.getvalue()
    cases = {
        "garbage": (
            _raw_file(tmp_path / "g.dcm", b"\x13\x37" * 700, ds.SOPInstanceUID),
            {0xC000, 0xC001},
        ),
        "truncated": (_raw_file(tmp_path / "t.dcm", body[:-101], ds.SOPInstanceUID), {0xC000}),
        "uid mismatch": (_raw_file(tmp_path / "m.dcm", body, generate_uid()), {0xC002}),
    }
    with RunningNode(node):
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="FEDNODE")
        assert assoc.is_established
        try:
            for name, (path, expected) in cases.items():
                rsp = assoc.send_c_store(path)
                assert int(rsp.Status) in expected, name
                assert rsp.get("ErrorComment"), name
            good = write(ds.copy(), tmp_path / "good.dcm")
            assert int(assoc.send_c_store(good).Status) == 0x0000
        finally:
            assoc.release()
    assert instance_keys(node) == [uid_pseudonym(node.keys().site, ds.SOPInstanceUID)]
    assert len(list(node.settings().spool_dir.iterdir())) == 1


def test_free_space_floor_refuses_with_a700(tmp_path: Path) -> None:
    node = init_node(tmp_path / "full")
    paths = write_ct_study(tmp_path / "s", series=1, per_series=3, size=32)
    with RunningNode(node, env={"FEDNODE_DICOM__FREE_SPACE_FLOOR_MB": str(2**40)}):
        result = storescu(node, tmp_path / "s")
    assert "Refused: OutOfResources" in result.stderr
    assert "Success" not in result.stderr
    assert instance_keys(node) == [] and list(node.settings().spool_dir.iterdir()) == []
    assert len(paths) == 3


class _Proxy:
    """A TCP forwarder the test can cut, to take PostgreSQL away from a running node."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.up = True
        self._conns: list[socket.socket] = []
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up = False
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self._srv.close()


@pytest.mark.postgres
def test_database_down_refuses_with_a700_then_recovers(tmp_path: Path, pg_url: str) -> None:
    proxy = _Proxy(("127.0.0.1", 5432))
    url = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    node = init_node(tmp_path / "pg")
    node.extra_env["FEDNODE_DATABASE__URL"] = url
    node.cli("db", "upgrade")
    write_ct_study(tmp_path / "a", series=1, per_series=2, size=32)
    write_ct_study(tmp_path / "b", series=1, per_series=2, size=32)
    try:
        with RunningNode(node) as running:
            proxy.cut()
            down = storescu(node, tmp_path / "a")
            assert "Refused: OutOfResources" in down.stderr and "Success" not in down.stderr
            assert Spool(node.settings().spool_dir, node.keys().spool).names() == []
            proxy.restore()
            up = storescu(node, tmp_path / "b")
            assert up.stderr.count("Received Store Response (Success)") == 2, up.stderr
            assert running.stop() == 0
    finally:
        proxy.close()
    db = Database(pg_url)
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 2
    db.dispose()
    fallback = (node.settings().data_dir / "audit-fallback.jsonl").read_text().splitlines()
    assert any(json.loads(line)["detail"]["status"] == "0xA700" for line in fallback)


def test_serve_refuses_unmigrated_database_and_bad_config(tmp_path: Path) -> None:
    node = init_node(tmp_path / "n")
    db_path = node.settings().data_dir / "fednode.db"
    db_path.unlink()
    proc = run_cli("serve", "-c", str(node.config), check=False)
    assert proc.returncode == 6 and "fednode db upgrade" in proc.stderr
    node.cli("db", "upgrade")
    bad = run_cli("serve", "-c", str(node.config), env={"FEDNODE_DICOM__PORT": "0"}, check=False)
    assert bad.returncode == 3 and "dicom.port" in bad.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", node.port)) != 0


def test_sigterm_finishes_in_flight_stores_and_exits_zero(node: NodeDir, tmp_path: Path) -> None:
    paths = write_ct_study(tmp_path / "big", series=2, per_series=60, size=256)
    uid_of = {str(p): ct_uid(p) for p in paths}
    running = RunningNode(node)
    proc = storescu_stream(node, tmp_path / "big")
    acknowledged: list[str] = []
    for path in acknowledged_files(proc):
        acknowledged.append(uid_of[path])
        if len(acknowledged) == 10:
            running.proc.send_signal(15)
    proc.wait(60)
    assert running.stop() == 0
    # The association in flight was allowed to finish: every instance arrived.
    assert proc.returncode == 0 and len(acknowledged) == len(paths)
    keys = node.keys()
    assert sorted(instance_keys(node)) == sorted(uid_pseudonym(keys.site, u) for u in acknowledged)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", node.port)) != 0


def test_sigterm_does_not_wait_for_a_silent_connection(node: NodeDir) -> None:
    # A peer that connects and never sends its A-ASSOCIATE-RQ: shutdown closes it instead of
    # waiting out the ACSE timeout (set far above the stop timeout here).
    running = RunningNode(node, env={"FEDNODE_DICOM__ACSE_TIMEOUT": "300"})
    with socket.create_connection(("127.0.0.1", node.port)) as silent:
        silent.settimeout(20)
        time.sleep(0.5)  # accepted by an SCP process
        assert running.stop(timeout=20) == 0
        try:  # closed by the node, not by the test (a reset when the process has exited)
            assert silent.recv(1) == b""
        except ConnectionResetError:
            pass


def test_operating_commands(node: NodeDir, tmp_path: Path) -> None:
    write_ct_study(tmp_path / "s", series=1, per_series=4, size=32)
    storescp_port = free_port()
    peer = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "ARCHIVE", "-od", str(tmp_path), str(storescp_port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with RunningNode(node) as running:
            assert storescu(node, tmp_path / "s").returncode == 0
            self_echo = node.cli(
                "echo", f"FEDNODE@127.0.0.1:{node.port}", "--calling-ae", "ECHOSCU"
            )
            assert "C-ECHO ok" in self_echo.stdout
            time.sleep(0.3)
            dcmtk_echo = node.cli("echo", f"ARCHIVE@127.0.0.1:{storescp_port}")
            assert "C-ECHO ok" in dcmtk_echo.stdout
            refused = node.cli(
                "echo", f"FEDNODE@127.0.0.1:{node.port}", "--calling-ae", "NOPE", check=False
            )
            assert refused.returncode == 7 and "rejected" in refused.stderr
            assert node.cli("echo", "not-an-address", check=False).returncode == 2  # usage
            running.stop()
    finally:
        peer.terminate()
        peer.wait(10)
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["instances"] == {"received": 4}
    assert status["jobs"] == [{"kind": "deidentify", "state": "queued", "count": 4}]
    assert status["spool"]["items"] == 4 and status["spool"]["oldest"]
    table = node.cli("status").stdout
    assert "deidentify" in table and "spool: 4 item(s)" in table
    listed = json.loads(node.cli("jobs", "list", "--json", "--state", "queued").stdout)
    assert len(listed) == 4 and {j["kind"] for j in listed} == {"deidentify"}
    # Dead-letter one job by hand, then operate on it.
    db = db_of(node)
    from storage.queue import SqlQueue

    q = SqlQueue(db)
    job = q.lease("test", ["deidentify"], 60)
    assert job is not None
    q.fail(job, "ValueError: simulated", retry_in=None)
    status = json.loads(node.cli("status", "--json").stdout)
    assert status["dead_letters"][0]["last_error"] == "ValueError: simulated"
    assert "re-queued 1 job(s)" in node.cli("jobs", "retry", str(job.id)).stdout
    job = q.lease("test", ["deidentify"], 60)
    assert job is not None and q.complete(job)
    assert "purged 1 done job(s)" in node.cli("jobs", "purge", "--state", "done").stdout
    assert node.cli("jobs", "purge", "--state", "queued", check=False).returncode == 2
    db.dispose()
