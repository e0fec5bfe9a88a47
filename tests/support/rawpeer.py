"""A DICOM upper-layer peer written byte by byte (PS3.8 9.3), for tests that must send what no
well-behaved toolkit sends: partial PDUs, lying lengths, one byte at a time.

Only what the hostile-peer tests need: an A-ASSOCIATE-RQ, reading PDUs, a C-STORE-RQ with its
data set, the C-STORE-RSP status.
"""

from __future__ import annotations

import socket
import struct
import time

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(
    called: str, calling: str, contexts: list[tuple[int, str, list[str]]], max_pdu: int = 65536
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing *contexts* (id, abstract, [syntaxes])."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for cx_id, abstract, syntaxes in contexts:
        body = bytes((cx_id, 0, 0, 0)) + _item(0x30, abstract.encode())
        body += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        items += _item(0x20, body)
    user = _item(0x51, struct.pack(">L", max_pdu))
    user += _item(0x52, b"1.2.826.0.1.3680043.9.7156.1")
    items += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body = fixed + b"\x00" * 32 + items
    return struct.pack(">BBL", A_ASSOCIATE_RQ, 0, len(body)) + body


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, elem, len(value)) + value


def store_rq_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian."""
    body = b"".join([
        _element(0x0002, _uid(sop_class)),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000)),
        _element(0x1000, _uid(sop_instance)),
    ])
    return _element(0x0000, struct.pack("<L", len(body))) + body


def pdata(cx_id: int, payload: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF PDU holding one PDV (PS3.8 9.3.5, E.2)."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">L", len(payload) + 2) + bytes((cx_id, control)) + payload
    return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv


class RawPeer:
    """One TCP connection to an SCP, driven PDU by PDU."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or ``None`` if the SCP closed the connection."""
        self.sock.settimeout(timeout)
        try:
            header = self._read(6)
            if header is None:
                return None
            kind, _, length = struct.unpack(">BBL", header)
            body = self._read(length)
        except ConnectionResetError:
            return None
        return None if body is None else (kind, body)

    def _read(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def closed_within(self, seconds: float) -> bool:
        """Whether the SCP closes the connection (possibly after an A-ABORT) in time."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                pdu = self.read_pdu(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            except OSError:
                return True
            if pdu is None:
                return True
        return False

    def associate(
        self, called: str, calling: str, contexts: list[tuple[int, str, list[str]]],
        max_pdu: int = 65536,
    ) -> dict[int, str]:
        """Associate; return the accepted contexts (id → transfer syntax)."""
        self.send(associate_rq(called, calling, contexts, max_pdu))
        pdu = self.read_pdu()
        if pdu is None or pdu[0] != A_ASSOCIATE_AC:
            raise AssertionError(f"association not accepted: {pdu and pdu[0]}")
        body = pdu[1]
        pos, accepted = 68, {}
        while pos + 4 <= len(body):
            kind, _, length = struct.unpack_from(">BBH", body, pos)
            if kind == 0x21:
                cx_id, result = body[pos + 4], body[pos + 6]
                sub = body[pos + 8 : pos + 4 + length]
                ts = sub[4 : 4 + struct.unpack_from(">H", sub, 2)[0]].decode().strip("\x00")
                if result == 0:
                    accepted[cx_id] = ts
            pos += 4 + length
        return accepted

    def store(
        self, cx_id: int, sop_class: str, sop_instance: str, dataset: bytes,
        *, max_pdu: int = 65536, timeout: float = 30.0,
    ) -> int | None:
        """Send a C-STORE-RQ and its data set; return the response status, or ``None`` if
        the SCP aborted or closed instead of answering."""
        self.send(pdata(cx_id, store_rq_command(sop_class, sop_instance), command=True, last=True))
        room = max_pdu - 6
        for start in range(0, max(len(dataset), 1), room):
            chunk = dataset[start : start + room]
            self.send(pdata(cx_id, chunk, command=False, last=start + room >= len(dataset)))
        return self.read_status(timeout)

    def read_status(self, timeout: float = 30.0) -> int | None:
        command = b""
        while True:
            pdu = self.read_pdu(timeout)
            if pdu is None or pdu[0] != P_DATA_TF:
                return None
            body, pos = pdu[1], 0
            while pos < len(body):
                (length,) = struct.unpack_from(">L", body, pos)
                control = body[pos + 5]
                command += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 0x03 == 0x03:
                    return _status(command)

    def release(self) -> None:
        self.send(struct.pack(">BBL", A_RELEASE_RQ, 0, 4) + b"\x00" * 4)
        self.read_pdu(timeout=5)


def _status(command: bytes) -> int | None:
    pos = 0
    while pos + 8 <= len(command):
        _, elem, length = struct.unpack_from("<HHL", command, pos)
        if elem == 0x0900:
            return int(struct.unpack_from("<H", command, pos + 8)[0])
        pos += 8 + length
    return None
