"""Hostile peers on loopback (issue 18): the port holds, every allocation is bounded.

One node (2 SCP processes, ``max_associations = 4``, at most 2 connections waiting unassociated,
short deadlines so the suite runs in seconds) faces, test by test: oversized PDU headers,
one-byte senders, silent connections, a deflate bomb, an instance over the size limit, deep
defined-length nesting. For each the test checks the answer (status, A-ABORT or close), that a
real DCMTK ``echoscu``/``storescu`` is served within a few seconds meanwhile, and the SCP
processes' peak memory: each one's ``VmHWM`` may grow by at most ``MEMORY_BOUND`` over its
level after start-up, over the whole suite (the largest buffers allowed are the 32 MiB
instance limit and the 16 MiB inflation limit).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from storage.db import Database
from storage.models import AuditEvent
from tests.support.dicomgen import FakeStudy, ct_instance, write, write_ct_study
from tests.support.node import DCMTK_ENV, NodeDir, RunningNode, dcmtk, init_node
from tests.support.rawpeer import DEFLATED_LE, EXPLICIT_LE, RawPeer, associate_rq

pytestmark = pytest.mark.dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
LIMITS = {
    "FEDNODE_DICOM__MAX_ASSOCIATIONS": "4",
    "FEDNODE_DICOM__MAX_PENDING_CONNECTIONS": "2",
    "FEDNODE_DICOM__FIRST_PDU_TIMEOUT": "1",
    "FEDNODE_DICOM__PDU_TIMEOUT": "2",
    "FEDNODE_DICOM__MAX_INSTANCE_MB": "32",
    "FEDNODE_DICOM__MAX_INFLATED_MB": "16",
    "FEDNODE_DICOM__SHUTDOWN_GRACE_SECONDS": "20",
}
MEMORY_BOUND = 96 << 20
SERVED_WITHIN = 5.0  # seconds a real peer may take to be served while the node is attacked


# -- the node and its processes ---------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


class Node:
    def __init__(self, node: NodeDir, running: RunningNode) -> None:
        self.dir = node
        self.running = running
        self.port = node.port
        time.sleep(0.5)  # the SCP processes finish starting
        self.scps = _children(running.proc.pid)  # workers=0: every child is an SCP process
        assert len(self.scps) == 2
        self.baseline = {pid: _peak_rss(pid) for pid in self.scps}

    def growth(self) -> int:
        return max(_peak_rss(pid) - self.baseline[pid] for pid in self.scps)

    def log(self) -> str:
        return self.running.log.read_text()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    write_ct_study(folder, series=1, per_series=1, size=32)
    return next(folder.rglob("*.dcm"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node_dir = init_node(tmp_path_factory.mktemp("hostile") / "node")
    with RunningNode(node_dir, env=LIMITS, processes=2) as running:
        yield Node(node_dir, running)
        assert running.stop(timeout=30) == 0


@pytest.fixture(autouse=True)
def _memory_bounded(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "node" in request.fixturenames:
        node: Node = request.getfixturevalue("node")
        assert node.growth() <= MEMORY_BOUND, f"an SCP process grew by {node.growth()} bytes"


# -- real peers -------------------------------------------------------------------------------
def assert_served(node: Node, study: Path) -> None:
    """A DCMTK echoscu and storescu are each served (success) within SERVED_WITHIN seconds."""
    for cmd in (
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "FEDNODE", "127.0.0.1", str(node.port)],
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "FEDNODE", "127.0.0.1", str(node.port),
         str(study)],
    ):
        started = time.monotonic()
        proc = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        took = time.monotonic() - started
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert took < SERVED_WITHIN, f"{cmd[0]} took {took:.1f} s"


def connect(node: Node) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def closed_by_node(sock: socket.socket, within: float) -> bool:
    """Whether the node closes *sock* (after an A-ABORT, or not) within *within* seconds."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                return True
            # Anything the node sends first must be an A-ABORT or A-ASSOCIATE-RJ.
            assert data[0] in (0x03, 0x07), data[:6]
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def associated(node: Node, syntax: str = EXPLICIT_LE) -> tuple[RawPeer, int]:
    peer = RawPeer(node.port)
    accepted = peer.associate("FEDNODE", "STORESCU", [(1, CT, [syntax])])
    assert accepted == {1: syntax}
    return peer, 1


# -- datasets -------------------------------------------------------------------------------
def _ui(group: int, elem: int, value: str) -> bytes:
    raw = value.encode() + (b"\x00" if len(value) % 2 else b"")
    return struct.pack("<HH2sH", group, elem, b"UI", len(raw)) + raw


def nested_dataset(depth: int, *, bad_inner_length: bool = False) -> tuple[str, bytes]:
    """A CT-classed dataset whose (0008,1140) sequence nests *depth* defined-length items."""
    inner = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 0x20 if bad_inner_length else 4)
    inner += b"CODE"
    for _ in range(depth):
        item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, len(item)) + item
    sop = generate_uid()
    body = _ui(0x0008, 0x0016, CT) + _ui(0x0008, 0x0018, sop) + inner
    body += _ui(0x0020, 0x000D, generate_uid()) + _ui(0x0020, 0x000E, generate_uid())
    return sop, body


def ct_bytes(extra: bytes = b"") -> tuple[str, bytes]:
    ds = ct_instance(FakeStudy(), generate_uid(), 1, 0, size=16)
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return str(ds.SOPInstanceUID), out.getvalue() + extra


def private_ob(size: int) -> bytes:
    """A private (0099,0010) creator and a (0099,1000) OB element of *size* zero bytes (sorts
    after every standard element of a CT up to the pixel data, so appended last it is the
    dataset's last element but for the order of (7FE0,0010): the walker does not check order)."""
    creator = b"FEDNODE "
    head = struct.pack("<HH2sH", 0x0099, 0x0010, b"LO", len(creator)) + creator
    return head + struct.pack("<HH2sHL", 0x0099, 0x1000, b"OB", 0, size)


# -- the attacks ------------------------------------------------------------------------------
def test_oversized_pdu_headers_are_refused_without_allocating(node: Node, study: Path) -> None:
    # A-ASSOCIATE-RQ headers announcing 4 GiB, then silence: refused (A-ABORT) at once.
    liars = [connect(node) for _ in range(6)]
    for sock in liars:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFFF))
    assert_served(node, study)
    assert all(closed_by_node(sock, 3) for sock in liars)
    # Under the A-ASSOCIATE-RQ cap but never completed: closed at the first-PDU deadline.
    partial = connect(node)
    partial.sendall(struct.pack(">BBL", 0x01, 0, 200_000) + b"\x00\x01")
    assert closed_by_node(partial, 3)
    # Associated, then a P-DATA-TF announcing 4 GiB (or 2 MiB, over the negotiated 1 MiB).
    for length in (0xFFFFFFFF, 2 << 20):
        peer, _ = associated(node)
        peer.send(struct.pack(">BBL", 0x04, 0, length) + b"\x00" * 100)
        assert peer.closed_within(3)
        peer.close()
    assert_served(node, study)
    for sock in [*liars, partial]:
        sock.close()


def test_one_byte_senders_do_not_keep_real_peers_out(node: Node, study: Path) -> None:
    stop = threading.Event()
    socks = [connect(node) for _ in range(17)]
    for sock in socks:
        sock.sendall(b"\x01")  # the first byte of an A-ASSOCIATE-RQ, then nothing

    def trickle() -> None:  # and one that sends a byte every 0.3 s, forever
        try:
            with connect(node) as sock:
                header = struct.pack(">BBL", 0x01, 0, 300) + b"\x00" * 300
                for byte in header:
                    if stop.wait(0.3):
                        return
                    sock.sendall(bytes([byte]))
        except OSError:
            return  # closed by the node: the expected end

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        for _ in range(2):
            assert_served(node, study)
        # Each was closed: made room for newer connections, or at its first-PDU deadline.
        assert all(closed_by_node(sock, 3) for sock in socks)
        thread.join(5)
        assert not thread.is_alive()  # the trickler's connection was closed too
    finally:
        stop.set()
        for sock in socks:
            sock.close()


def test_silent_connections_do_not_keep_real_peers_out(node: Node, study: Path) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(2):  # and again, as an attacker would repeat it
            batch = [connect(node) for _ in range(50)]
            socks += batch
            assert_served(node, study)
            assert all(closed_by_node(sock, 3) for sock in batch)
    finally:
        for sock in socks:
            sock.close()


def test_a_deflate_bomb_is_refused(node: Node, study: Path) -> None:
    sop, raw = ct_bytes(private_ob(64 << 20))  # inflates to 64 MiB; the limit is 16 MiB
    raw += b"\x00" * (64 << 20)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = comp.compress(raw) + comp.flush()
    del raw
    assert len(bomb) < 200_000
    peer, cx = associated(node, DEFLATED_LE)
    with peer:
        assert peer.store(cx, CT, sop, bomb) == 0xA700
        # The same association still works for a reasonable deflated instance.
        sop, small = ct_bytes()
        comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        assert peer.store(cx, CT, sop, comp.compress(small) + comp.flush()) == 0x0000
        peer.release()
    assert "deflated dataset inflates beyond the limit" in node.log()
    assert_served(node, study)


def test_an_instance_over_the_size_limit_is_refused_and_audited(node: Node, study: Path) -> None:
    sop, raw = ct_bytes(private_ob(40 << 20))
    raw += b"\x00" * (40 << 20)  # 40 MiB; the limit is 32 MiB
    peer, cx = associated(node)
    with peer:
        assert peer.store(cx, CT, sop, raw, max_pdu=1 << 20) == 0xA700
        del raw
        sop, small = ct_bytes()
        assert peer.store(cx, CT, sop, small) == 0x0000
        peer.release()
    assert "exceeds the maximum instance size" in node.log()
    db = Database(node.dir.settings().database_url)
    try:
        with db.session() as session:
            events = session.scalars(
                select(AuditEvent).where(AuditEvent.event == "store-failed")
            )
            reasons = [e.detail.get("reason") for e in events]
    finally:
        db.dispose()
    assert "instance exceeds the maximum instance size" in reasons
    assert_served(node, study)


@pytest.mark.parametrize(
    ("depth", "bad", "status"),
    [(40, False, 0x0000), (200, False, 0xC000), (3000, False, 0xC000), (3, True, 0xC000)],
)
def test_deep_defined_length_nesting_is_refused_before_acknowledging(
    node: Node, study: Path, depth: int, bad: bool, status: int
) -> None:
    sop, raw = nested_dataset(depth, bad_inner_length=bad)
    peer, cx = associated(node)
    with peer:
        assert peer.store(cx, CT, sop, raw) == status
        peer.release()
    assert_served(node, study)


def test_sigterm_returns_within_seconds_whatever_the_peers_do(
    tmp_path: Path, study: Path
) -> None:
    node_dir = init_node(tmp_path / "n")
    with RunningNode(node_dir, env=LIMITS, processes=2) as running:
        node = Node(node_dir, running)
        silent = [connect(node) for _ in range(20)]
        for sock in silent[:10]:
            sock.sendall(b"\x01")
        idle, _ = associated(node)  # associated, then never sends anything
        midway, _ = associated(node)  # inside a P-DATA-TF PDU when the node stops
        midway.send(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
        time.sleep(0.3)
        started = time.monotonic()
        assert running.stop(timeout=30) == 0
        took = time.monotonic() - started
        assert took < 6.0, f"SIGTERM took {took:.1f} s"
        for peer in (idle, midway):
            peer.close()
        for sock in silent:
            sock.close()
    assert os.path.exists(running.log)


def test_a_calling_ae_title_with_a_newline_is_one_log_line(node: Node) -> None:
    with RawPeer(node.port) as peer:
        peer.send(associate_rq("FEDNODE", "EVIL\nFORGED", [(1, CT, [EXPLICIT_LE])]))
        pdu = peer.read_pdu()
        # Refused: A-ASSOCIATE-RJ (not a configured peer) or A-ABORT (a malformed title).
        assert pdu is not None and pdu[0] in (0x03, 0x07)
    time.sleep(0.2)
    lines = node.log().splitlines()
    # Logged (by pynetdicom, which refuses the title, or by the node), always on one line.
    assert any("FORGED" in line for line in lines)
    assert all("EVIL" in line for line in lines if "FORGED" in line)


# Values pydicom finds invalid and quotes when it validates them (DA, AS, CS, TM).
IDENTIFYING = {
    "PatientBirthDate": "19XX0101",
    "PatientAge": "S3CRT",
    "PatientSex": "secretsex",
    "StudyTime": "2599XX",
    "PatientName": "SECRETFAMILY^SECRETGIVEN",
    "PatientID": "SECRET-PID-4711",
}


def _with_identifying_values() -> Dataset:
    ds = ct_instance(FakeStudy(), generate_uid(), 1, 0, size=16)
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    return ds


def _explicit_meta_implicit_body(ds: Dataset, path: Path) -> None:
    """A file whose File Meta says Explicit VR Little Endian but whose dataset is encoded in
    Implicit VR: the de-identifier refuses its encoding and repairs it by pydicom's lenient
    reading, which validates (and quotes) every value it converts."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = EXPLICIT_LE
    out = DicomBytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    out.is_little_endian, out.is_implicit_VR = True, True
    write_dataset(out, ds)
    path.write_bytes(out.getvalue())


def test_identifying_values_never_reach_a_log_line(tmp_path: Path) -> None:
    files = tmp_path / "in"
    files.mkdir()
    for i in range(3):
        ds = _with_identifying_values()
        write(ds, files / f"{i}.dcm")
    node_dir = init_node(tmp_path / "n")
    with RunningNode(node_dir, env=LIMITS, processes=1, workers=1) as running:
        proc = subprocess.run(
            [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "FEDNODE", "+sd", "127.0.0.1",
             str(node_dir.port), str(files)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        db = Database(node_dir.settings().database_url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with db.read() as conn:
                    states = [r[0] for r in conn.exec_driver_sql("SELECT state FROM instances")]
                if len(states) == 3 and all(s != "received" for s in states):
                    break
                time.sleep(0.2)
        finally:
            db.dispose()
        assert len(states) == 3 and "received" not in states, states
        assert running.stop(timeout=30) == 0
        serve_log = running.log.read_text()
    # The same values through `fednode deid` on files whose encoding must be repaired by
    # pydicom's lenient reader (the path on which pydicom validates and quotes them).
    broken = tmp_path / "broken"
    broken.mkdir()
    _explicit_meta_implicit_body(_with_identifying_values(), broken / "b.dcm")
    cli = node_dir.cli("deid", str(broken), "--out", str(tmp_path / "out"), check=False)
    assert cli.returncode in (0, 1), cli.stderr
    assert list((tmp_path / "out").rglob("*.dcm")), cli.stdout + cli.stderr  # repaired
    for text in (serve_log, cli.stdout + cli.stderr):
        for keyword, value in IDENTIFYING.items():
            for line in text.splitlines():
                assert value not in line, f"{keyword} in: {line}"
