"""The PS3.8 fast path: the pynetdicom 3.0 acceptor internals the node replaces.

pynetdicom's data phase is built from two polling threads per association (the DUL reactor
sleeps between socket polls, the association reactor sleeps 1 ms per loop) and hands every PDU
through three queues, a state machine and a DIMSE decoder that reads the socket 4 KiB at a
time; it also deep-copies every supported presentation context (≈ 6000 transfer syntax UIDs,
each re-validated by pydicom: ≈ 40 ms of CPU) for each association. Measured with DCMTK
``storescu`` on 2 cores, that caps a pynetdicom SCP that does nothing with what it receives at
300-480 CT instances/s; this module's own path, at 1200-2000/s
(``tests/benchmarks/bench_receive.py``; the durable work in :mod:`node.dicom.receive` then
dominates). So, for the association acceptor only, this module replaces three pieces of
pynetdicom 3.0 (``RequestHandler``, ``DULServiceProvider``, ``Association``; internals, hence
pynetdicom pinned ``<3.1`` in pyproject):

- the per-association context copy is a shallow copy (negotiation never mutates them);
- the DUL reactor blocks in ``poll()`` on the socket and a wake-up pipe instead of polling;
- a C-STORE-RQ on an accepted storage context is assembled and answered in the DUL thread
  itself (the DCMTK model: one thread reads, stores, answers), without the state machine:
  in Sta6 a P-DATA-TF changes no state, so pynetdicom's own path would do the same work
  (DT-2 in, DT-1 out) through queues. Its data set fragments go from the socket straight
  into one reused buffer; the response is byte for byte the one pynetdicom would send.
  Everything else (association negotiation, C-ECHO, release, abort, any message the fast
  path does not recognise) still goes through pynetdicom unchanged, the raw PDVs handed
  over in order;
- the association reactor waits on an event the DUL sets instead of sleeping 1 ms per loop.

:class:`SharedSocketServer` is pynetdicom's threaded server around a listening socket that
several SCP processes share. What the node does with a received data set (the policy) is not
here: the server calls the *store* function it is given (:meth:`node.dicom.scp.StorageSCP.
store_fast`) in the DUL thread.

The DUL here also holds the port against untrusted peers (issue 18; :class:`Limits`): no
announced length is allocated up front (PDU bodies are read as their bytes arrive), non-P-DATA
PDUs are capped at :data:`MAX_ASSOCIATE_RQ` and P-DATA-TF at the negotiated maximum, the
A-ASSOCIATE-RQ must arrive within the first-PDU deadline (the ARTIM timer) and every PDU within
the per-PDU deadline, a data set beyond the maximum instance size is discarded as it arrives,
connections not yet associated are capped per process (oldest closed first) and do not count
against the association limit (:class:`AcceptorAE`), and :meth:`SharedSocketServer.stop`
returns within the grace period whatever the peers do.

``FAST_STORE_PATH = False`` leaves every message to pynetdicom (tests compare both paths).
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.dicom.sockets import set_nodelay

logger = logging.getLogger(__name__)

# The fast C-STORE path (module docstring); False leaves every message to pynetdicom.
FAST_STORE_PATH = True
# Longest the DUL and association reactors block without an event (timers, kill flags).
_REACTOR_WAIT = 0.05
# How long a process with N associations waits before accepting one more (see get_request).
_ACCEPT_YIELD, _ACCEPT_YIELD_MAX, _ACCEPT_RECENT = 0.01, 0.05, 0.5

MAX_ASSOCIATE_RQ = 256 << 10
"""The largest A-ASSOCIATE-RQ (and any other non-P-DATA PDU) read, bytes: 128 presentation
contexts with a dozen transfer syntaxes each and a 64 KiB user identity fit in it."""
_MAX_COMMAND = 64 << 10  # a DIMSE command set is a few hundred bytes (PS3.7 9.3, 10.3)
_READ_CHUNK = 64 << 10  # PDU bodies are read (and allocated) this much at a time
_GROW_STEP = 8 << 20  # the data set buffer grows by at most this much ahead of the bytes
_READ_SLICE = 0.5  # a read waiting this long for a byte wakes to check its deadline


@dataclass(frozen=True)
class Limits:
    """What a peer may do before and while it is trusted (per SCP process).

    Attributes
    ----------
    first_pdu_timeout
        Seconds from the TCP connection until its A-ASSOCIATE-RQ has been read completely
        (the ARTIM timer of PS3.8 9.1.5, also the longest wait for the peer to close after
        an A-ABORT or A-RELEASE-RP).
    pdu_timeout
        Seconds one PDU may take from its first byte to its last (the progress deadline of
        every read; between PDUs the idle limit is ``network_timeout``).
    max_pending
        Connections of this process that have not yet sent their A-ASSOCIATE-RQ; when one
        more arrives, the oldest of them is closed. They do not count against the
        association limit.
    max_instance
        Largest data set received, bytes: beyond it the fragments are discarded as they
        arrive and the C-STORE is answered with a failure.
    """

    first_pdu_timeout: float = 10.0
    pdu_timeout: float = 30.0
    max_pending: int = 8
    max_instance: int = 1 << 30


class _Timeout(Exception):
    """The peer did not send a PDU (or the first PDU) within its deadline."""


# -- the fast data phase (module docstring) ---------------------------------------------------
_PDU_HEADER = struct.Struct(">BBL")
_PDV_LENGTH = struct.Struct(">L")
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")
_P_DATA_TF = 0x04
_C_STORE_RQ, _C_STORE_RSP, _NO_DATASET = 0x0001, 0x8001, 0x0101
# Command elements (group 0000, PS3.7 E.1): keyed by element number.
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0002, 0x0100, 0x0110
_RESPONDED_TO, _DATASET_TYPE = 0x0120, 0x0800
_STATUS, _ERROR_COMMENT, _AFFECTED_SOP_INSTANCE = 0x0900, 0x0902, 0x1000


class _InvalidPData(Exception):
    """A P-DATA-TF PDU that breaks PS3.8 9.3.5 / Annex E framing or a limit (answered with
    Evt19: A-ABORT)."""


class _Closed(Exception):
    """The connection closed or failed inside a PDU (answered with Evt17)."""


@dataclass(frozen=True)
class StoreRequest:
    """The fields of a C-STORE-RQ the node uses (PS3.7 9.3.1.1)."""

    context_id: int
    transfer_syntax: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


StoreFunc = Callable[[Any, StoreRequest, memoryview], tuple[int, str]]
OversizedFunc = Callable[[Any, StoreRequest, int], tuple[int, str]]


def _parse_command(buf: bytes | bytearray) -> dict[int, bytes] | None:
    """Split an encoded command set (Implicit VR Little Endian, group 0000) by element."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(buf)
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = _ELEMENT.unpack_from(buf, pos)
        stop = pos + 8 + length
        if group != 0 or stop > end:
            return None
        out[elem] = bytes(buf[pos + 8 : stop])
        pos = stop
    return out


def _us(fields: dict[int, bytes], elem: int) -> int | None:
    value = fields.get(elem)
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _text(fields: dict[int, bytes], elem: int) -> str:
    return fields.get(elem, b"").decode("ascii", "replace").strip("\x00 ")


def _element(elem: int, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return _ELEMENT.pack(0, elem, len(value)) + value


def encode_store_rsp(req: StoreRequest, status: int, comment: str = "") -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), Implicit VR Little Endian."""
    body = b"".join(
        [
            _element(_AFFECTED_SOP_CLASS, req.sop_class_uid.encode("ascii", "replace"), b"\x00"),
            _element(_COMMAND_FIELD, _US.pack(_C_STORE_RSP), b""),
            _element(_RESPONDED_TO, _US.pack(req.message_id), b""),
            _element(_DATASET_TYPE, _US.pack(_NO_DATASET), b""),
            _element(_STATUS, _US.pack(status), b""),
            _element(_ERROR_COMMENT, comment[:64].encode("ascii", "replace"), b" ")
            if comment
            else b"",
            _element(
                _AFFECTED_SOP_INSTANCE, req.sop_instance_uid.encode("ascii", "replace"), b"\x00"
            ),
        ]
    )
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<L", len(body)) + body


def pdata_pdus(context_id: int, command: bytes, max_length: int) -> list[bytes]:
    """*command* as P-DATA-TF PDUs of at most *max_length* (0 = unlimited) (PS3.8 9.3.5)."""
    room = len(command) if not max_length else max(1, max_length - 6)
    pdus = []
    for start in range(0, len(command), room):
        chunk = command[start : start + room]
        header = 0x03 if start + room >= len(command) else 0x01
        pdv = _PDV_LENGTH.pack(len(chunk) + 2) + bytes((context_id, header)) + chunk
        pdus.append(_PDU_HEADER.pack(_P_DATA_TF, 0, len(pdv)) + pdv)
    return pdus


_IDLE, _COMMAND, _FAST, _LEGACY = range(4)
# The message buffer starts at 1 MiB and is dropped after a data set larger than 64 MiB.
_MIN_BUFFER, _KEEP_BUFFER = 1 << 20, 64 << 20


class _StoreDUL(DULServiceProvider):
    """pynetdicom's DUL provider, event-driven, with the fast C-STORE path in its thread.

    *store* is called in this thread with the association, the request and a view of the
    data set (valid during the call only), and returns the status and error comment to answer;
    *oversized* likewise for a data set larger than ``limits.max_instance`` (its fragments were
    discarded as they arrived), with the number of bytes received.

    No read trusts a length the peer announces: a PDU body is read (and its memory allocated)
    as its bytes arrive, an A-ASSOCIATE-RQ or any other non-P-DATA PDU is capped at
    :data:`MAX_ASSOCIATE_RQ`, a P-DATA-TF at the maximum length the node negotiated (PS3.8
    D.1), a data set at ``limits.max_instance``, and every PDU must arrive within
    ``limits.pdu_timeout`` (the first within ``limits.first_pdu_timeout`` of the connection).
    """

    def __init__(
        self, assoc: Association, store: StoreFunc, oversized: OversizedFunc, limits: Limits
    ) -> None:
        super().__init__(assoc)
        self._store = store
        self._oversized = oversized
        self.limits = limits
        self.connected_at = time.monotonic()
        self.last_progress = self.connected_at  # when a byte last arrived
        self.busy = False  # a store is being handled in this thread
        self.evicted = False  # closed by the server to make room (see SharedSocketServer)
        self._deadline = float("inf")
        self._armed: socket.socket | None = None  # the socket SO_RCVTIMEO was set on
        self._received = 0  # bytes of the current fast data set, kept or discarded
        self._discarding = False
        self._legacy_bytes = 0
        # A pipe other threads write to wake the reactor out of poll(); it exists while the
        # reactor runs (created and closed in its thread, under the lock: a descriptor number
        # written to after close could belong to another file by then).
        self._wake_lock = threading.Lock()
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self._header = bytearray(6)
        self._pdv_header = bytearray(6)
        self._mode = _IDLE
        self._command = bytearray()
        self._pending: list[bytes] = []  # PDV items of a command not yet complete
        self._request: StoreRequest | None = None
        self._buffer = bytearray()  # the data set of the fast C-STORE being received
        self._used = 0

    # -- waking the reactor ---------------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w is None:
                return  # not running (yet, or any more): nothing to wake
            try:
                os.write(self._wake_w, b"\x00")
            except OSError:
                pass  # the pipe is full: the reactor is awake anyway

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """As pynetdicom's, waking the reactor instead of waiting for its next poll."""
        if self.state_machine.current_state != "Sta1":
            return False
        self._kill_thread = True
        self._wake()
        if threading.current_thread() is not self:
            self.join()
        return True

    def run_reactor(self) -> None:
        """pynetdicom's reactor loop, blocking in :meth:`_is_transport_event` when idle
        instead of sleeping ``_run_loop_delay`` between polls."""
        with self._wake_lock:
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        self._idle_timer.start()
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:  # as pynetdicom: abort, bypassing the state machine
                    logger.error("DUL reactor failed, aborting the association: %s",
                                 type(exc).__name__)
                    abort = A_ABORT_RQ()
                    abort.source = 0x02
                    abort.reason_diagnostic = 0x00
                    if self.socket is not None and self.socket.socket is not None:
                        self.socket.send(abort.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    continue
                before = self.state_machine.current_state
                self.state_machine.do_action(event)
                if before == "Sta2" and self.state_machine.current_state not in ("Sta2", "Sta3"):
                    # The connection ended before its A-ASSOCIATE-RQ (closed, ARTIM expired,
                    # a PDU refused): the association thread waiting for the request must not
                    # wait out the ACSE timeout. None is "timed out" to it.
                    self.to_user_queue.put(None)  # type: ignore[arg-type]
                wake = getattr(self.assoc, "wake", None)
                if wake is not None:
                    wake()
        finally:
            wake = getattr(self.assoc, "wake", None)
            if wake is not None:
                wake()
            with self._wake_lock:
                for fd in (self._wake_r, self._wake_w):
                    if fd is not None:
                        os.close(fd)
                self._wake_r = self._wake_w = None

    def _is_transport_event(self) -> bool:
        if self.state_machine.current_state == "Sta13":
            return bool(super()._is_transport_event())
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            self._read_pdu_data()  # decrypted bytes already buffered: poll() cannot see them
            return True
        wake_r = self._wake_r
        assert wake_r is not None  # set while the reactor runs
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        if raw is not None:
            poller.register(raw, select.POLLIN)
        timeout = 0 if not self.event_queue.empty() else int(_REACTOR_WAIT * 1000)
        try:
            ready = poller.poll(timeout)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # as AssociationSocket.ready
            return False
        data = False
        for fd, _mask in ready:
            if fd == wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                data = True
        if data:
            self._read_pdu_data()
            return True
        return False

    # -- reading --------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Connected, no A-ASSOCIATE-RQ read yet (and not already closed to make room)."""
        return (
            not self.evicted
            and self.state_machine.current_state in ("Sta1", "Sta2")
            and self.assoc.requestor.primitive is None
            and not self.assoc._kill
        )

    def close_transport(self) -> None:
        """Shut the socket down (from any thread): a blocked read returns at once (Evt17)."""
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake()

    def _recv_into(self, view: memoryview) -> None:
        """Fill *view* from the socket before :attr:`_deadline`; :class:`_Closed` if the peer
        closes or it fails, :class:`_Timeout` when the deadline passes.

        The socket stays in blocking mode (Python's timeout mode would poll before every
        read: one more release of the GIL per read, which costs the other associations of
        the process measurably). Instead the kernel's receive timeout (``SO_RCVTIMEO``) wakes
        a read that waits longer than :data:`_READ_SLICE`, and the deadline is checked then
        and after every read."""
        sock = self.socket.socket if self.socket is not None else None
        if sock is None:
            raise _Closed
        if self._armed is not sock:
            self._arm(sock)
        got, want = 0, len(view)
        deadline = self._deadline
        while got < want:
            try:
                n = sock.recv_into(view[got:], want - got)
            except (BlockingIOError, ssl.SSLWantReadError):
                n = -1  # SO_RCVTIMEO: nothing arrived within the slice
            except OSError as exc:
                raise _Closed from exc
            if not n:
                raise _Closed
            if n > 0:
                got += n
            if time.monotonic() > deadline:
                raise _Timeout
        self.last_progress = time.monotonic()

    def _arm(self, sock: socket.socket) -> None:
        slice_ = min(_READ_SLICE, self.limits.pdu_timeout, self.limits.first_pdu_timeout)
        seconds = int(slice_)
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                struct.pack("ll", seconds, int((slice_ - seconds) * 1e6)),
            )
        except OSError:  # not a real socket (tests with socketpair): reads block as before
            pass
        self._armed = sock

    def _recv_bytes(self, size: int) -> bytearray:
        """*size* bytes, allocated as they arrive (never the announced size up front)."""
        if size <= _READ_CHUNK:
            data = bytearray(size)
            self._recv_into(memoryview(data))
            return data
        data = bytearray()
        chunk = bytearray(_READ_CHUNK)
        view = memoryview(chunk)
        while len(data) < size:
            n = min(_READ_CHUNK, size - len(data))
            self._recv_into(view[:n])
            data += view[:n]
        return data

    def _skip(self, size: int) -> None:
        """Read and drop *size* bytes (a data set beyond the size limit)."""
        chunk = memoryview(bytearray(min(size, _READ_CHUNK) or 1))
        while size:
            n = min(size, len(chunk))
            self._recv_into(chunk[:n])
            size -= n

    def _read_pdu_data(self) -> None:
        """As pynetdicom's (the same events on the same errors), reading each PDU whole, or
        a P-DATA-TF PDV by PDV with data set fragments straight into the message buffer,
        within the limits (class docstring)."""
        limits = self.limits
        state = self.state_machine.current_state
        self._deadline = time.monotonic() + limits.pdu_timeout
        if state in ("Sta1", "Sta2"):
            self._deadline = min(self._deadline, self.connected_at + limits.first_pdu_timeout)
        try:
            self._recv_into(memoryview(self._header))
            pdu_type, _, length = _PDU_HEADER.unpack(self._header)
            if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
                logger.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")
                return
            if pdu_type == _P_DATA_TF:
                cap = int(self.assoc.acceptor.maximum_length or 0)
                if cap and length > cap:
                    raise _InvalidPData(
                        f"a P-DATA-TF of {length} bytes exceeds the negotiated maximum {cap}"
                    )
                if FAST_STORE_PATH and state == "Sta6":
                    self._read_pdata(length)
                    return
            elif length > MAX_ASSOCIATE_RQ:
                raise _InvalidPData(
                    f"a PDU of type 0x{pdu_type:02X} announces {length} bytes "
                    f"(at most {MAX_ASSOCIATE_RQ} read)"
                )
            body = self._recv_bytes(length)
        except _Closed:
            self.event_queue.put("Evt17")  # closed (or broken) inside a PDU
            return
        except _Timeout:
            logger.warning(
                "closing a connection: no complete PDU within %s s (state %s)",
                limits.first_pdu_timeout if state in ("Sta1", "Sta2") else limits.pdu_timeout,
                state,
            )
            self.close_transport()
            self.event_queue.put("Evt17")
            return
        except _InvalidPData as exc:
            logger.error("invalid PDU: %s", exc)
            self.event_queue.put("Evt19")
            return
        self._to_pynetdicom(bytes(self._header) + body)

    def _to_pynetdicom(self, pdu_bytes: bytes) -> None:
        """pynetdicom's own handling of one received PDU (the end of its _read_pdu_data)."""
        try:
            pdu, event = self._decode_pdu(bytearray(pdu_bytes))
            self.event_queue.put(event)
        except Exception as exc:
            logger.error("unable to decode a received PDU: %s", type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _forward(self, items: list[bytes]) -> None:
        payload = b"".join(items)
        self._to_pynetdicom(_PDU_HEADER.pack(_P_DATA_TF, 0, len(payload)) + payload)

    # -- P-DATA ---------------------------------------------------------------------------
    def _read_pdata(self, length: int) -> None:
        """Read one P-DATA-TF PDU of *length* bytes and route its PDVs (PS3.8 9.3.5, Annex
        E) message by message: fast C-STORE data set fragments into :attr:`_buffer`, the
        PDVs of any other message on to pynetdicom, in order."""
        if not length:
            raise _InvalidPData("no presentation data value")
        header = self._pdv_header
        remaining = length
        forward: list[bytes] = []
        while remaining:
            if remaining < 6:
                raise _InvalidPData("truncated PDV item")
            self._recv_into(memoryview(header))
            (item_length,) = _PDV_LENGTH.unpack_from(header)
            if item_length < 2 or item_length + 4 > remaining:
                raise _InvalidPData("PDV item length out of range")
            remaining -= item_length + 4
            size = item_length - 2
            context_id, control = header[4], header[5]
            is_command, last = bool(control & 0x01), bool(control & 0x02)
            if self._mode == _FAST:
                request = self._request
                assert request is not None
                if is_command or context_id != request.context_id:
                    raise _InvalidPData("a command or another context inside a data set")
                self._receive_fragment(size)
                if last:
                    self._mode = _IDLE
                    self._finish_store()
                continue
            data = self._recv_bytes(size)
            item = bytes(header) + data
            if self._mode == _LEGACY:
                self._legacy_bytes += size
                if self._legacy_bytes > self.limits.max_instance:
                    raise _InvalidPData("a message larger than the maximum instance size")
                forward.append(item)
                if last and not is_command:
                    self._mode = _IDLE
                    self._legacy_bytes = 0
                    self._forward(forward)
                    forward = []
            elif not is_command:
                raise _InvalidPData("a data set fragment without a command")
            else:
                self._mode = _COMMAND
                self._pending.append(item)
                self._command += data
                if len(self._command) > _MAX_COMMAND:
                    raise _InvalidPData("a command set larger than any DIMSE command")
                if last:
                    forward = self._command_complete(context_id, forward)
        if forward:
            self._forward(forward)

    def _receive_fragment(self, size: int) -> None:
        """Append a data set fragment of *size* bytes to the buffer as its bytes arrive, or
        drop it once the data set exceeds ``limits.max_instance``."""
        end = self._received + size
        self._received = end
        if self._discarding or end > self.limits.max_instance:
            self._discarding = True
            self._skip(size)
            return
        pos = self._used
        while pos < end:
            step = min(end, pos + _GROW_STEP)
            if step > len(self._buffer):
                self._grow(step)
            self._recv_into(memoryview(self._buffer)[pos:step])
            pos = self._used = step

    def _grow(self, size: int) -> None:
        # Always a new buffer (never resized in place: a view may still be alive).
        doubled = min(2 * len(self._buffer), self.limits.max_instance)
        grown = bytearray(max(size, doubled, _MIN_BUFFER))
        grown[: self._used] = memoryview(self._buffer)[: self._used]
        self._buffer = grown

    def _command_complete(self, context_id: int, forward: list[bytes]) -> list[bytes]:
        fields = _parse_command(self._command)
        pending, self._pending, self._command = self._pending, [], bytearray()
        request = self._fast_request(fields, context_id) if fields is not None else None
        if request is not None:
            self._request, self._used, self._mode = request, 0, _FAST
            self._received, self._discarding = 0, False
            return forward
        # Not ours: pynetdicom gets the message exactly as received.
        forward.extend(pending)
        if fields is None or _us(fields, _DATASET_TYPE) == _NO_DATASET:
            self._mode = _IDLE
            self._forward(forward)
            return []
        self._mode = _LEGACY
        return forward

    def _fast_request(self, fields: dict[int, bytes], context_id: int) -> StoreRequest | None:
        """The request if the fast path may serve it exactly as pynetdicom would, else None."""
        assoc = self.assoc
        message_id = _us(fields, _MESSAGE_ID)
        if (
            _us(fields, _COMMAND_FIELD) != _C_STORE_RQ
            or _us(fields, _DATASET_TYPE) in (None, _NO_DATASET)
            or message_id is None
            or assoc._sent_release
            or assoc.acceptor.accepted_common_extended
            or _config.UNRESTRICTED_STORAGE_SERVICE
            or _config.STORE_RECV_CHUNKED_DATASET
        ):
            return None
        context = assoc._accepted_cx.get(context_id)
        sop_class = _text(fields, _AFFECTED_SOP_CLASS)
        if context is None or str(context.abstract_syntax) != sop_class:
            return None
        return StoreRequest(
            context_id=context_id,
            transfer_syntax=str(context.transfer_syntax[0]),
            message_id=message_id,
            sop_class_uid=sop_class,
            sop_instance_uid=_text(fields, _AFFECTED_SOP_INSTANCE),
        )

    def _finish_store(self) -> None:
        request, size = self._request, self._used
        assert request is not None
        self._request, self._used = None, 0
        self.busy = True
        try:
            if self._discarding:
                status, comment = self._oversized(self.assoc, request, self._received)
            else:
                # The data set is lent to the store for the call only (the buffer is reused).
                status, comment = self._store(
                    self.assoc, request, memoryview(self._buffer)[:size]
                )
        finally:
            self.busy = False
            self._discarding = False
        if len(self._buffer) > _KEEP_BUFFER:
            self._buffer = bytearray()
        # Answer only on an association still in Sta6 (not aborted). Not ``is_established``:
        # the association thread sets it only after the A-ASSOCIATE-AC has gone out, so a
        # fast peer's first request can arrive before it is set.
        if self.state_machine.current_state != "Sta6" or self.assoc.is_aborted:
            return
        sock = self.socket
        if sock is None:
            return
        peer_max = int(self.assoc.requestor.maximum_length or 0)
        for pdu in pdata_pdus(request.context_id, encode_store_rsp(request, status, comment),
                              peer_max):
            sock.send(pdu)


class _Association(Association):
    """pynetdicom's acceptor association whose reactor waits on an event, not a 1 ms sleep.

    The DUL sets the event after every state machine action (a decoded DIMSE message, a
    release or abort indication) and when it stops; the reactor re-checks at least every
    ``_REACTOR_WAIT`` seconds for the network timeout.
    """

    def __init__(
        self, ae: AE, mode: str, store: StoreFunc, oversized: OversizedFunc, limits: Limits
    ) -> None:
        super().__init__(ae, mode)
        self._wakeup = threading.Event()
        self.dul: _StoreDUL = _StoreDUL(self, store, oversized, limits)
        # The timeout setters configure the DUL's timers: apply them to the new one.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        # ARTIM (PS3.8 9.1.5): how long a new connection has to send its A-ASSOCIATE-RQ (and
        # how long the peer has to close after an A-ABORT or A-RELEASE-RP).
        self.dul.artim_timer.timeout = limits.first_pdu_timeout

    def wake(self) -> None:
        self._wakeup.set()

    def _run_reactor(self) -> None:
        """``Association._run_reactor`` of pynetdicom 3.0.4, with ``time.sleep(0.001)``
        replaced by the wait on :attr:`_wakeup` (the rest is the same logic, same order)."""
        self._is_paused = False
        while not self._kill:
            self._wakeup.wait(_REACTOR_WAIT)
            self._wakeup.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
                self._wakeup.set()  # another message may already be queued
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                logger.error("network timeout reached, aborting the association")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _copy_contexts(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """A per-association copy of the supported contexts, without pydicom re-validating every
    UID as ``deepcopy`` does (negotiation reads them and builds new result contexts)."""
    out = []
    for cx in contexts:
        new = copy.copy(cx)
        new._transfer_syntax = list(cx._transfer_syntax)
        out.append(new)
    return out


class _FastRequestHandler(RequestHandler):
    """pynetdicom's request handler building a :class:`_Association` with a
    :class:`_StoreDUL` (``RequestHandler._create_association`` of pynetdicom 3.0.4 otherwise)."""

    server: SharedSocketServer

    def _create_association(self) -> Association:
        server = self.server
        assoc = _Association(
            self.ae, MODE_ACCEPTOR, server.store, server.oversized, server.limits
        )
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        sock = AssociationSocket(assoc, client_socket=self.request)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = _copy_contexts(server.contexts)
        assoc.requestor.address_info = self.remote
        handlers: dict[Any, Any] = server._handlers
        for event, bound in handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler in bound:
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def _abort_now(assoc: _Association) -> None:
    """Send an A-ABORT and close the transport without waiting for the peer (stop)."""
    if assoc.dul.pending:
        assoc.dul.close_transport()
        return
    try:
        assoc.abort(block=False)
    except Exception as exc:  # the association may be ending on its own meanwhile
        logger.debug("abort failed: %s", type(exc).__name__)
    # Give the reactor a moment to send the A-ABORT; a read blocked on a silent peer is
    # ended by the shutdown.
    threading.Timer(0.2, assoc.dul.close_transport).start()


class AcceptorAE(AE):
    """pynetdicom's AE whose association limit counts negotiated associations only.

    pynetdicom refuses an A-ASSOCIATE-RQ ("local limit exceeded") when the AE's threads
    number more than ``maximum_associations``, counting connections that have not sent
    their request: trickling or silent connections could keep real peers out. Here they do
    not count (:meth:`SharedSocketServer._make_room` bounds them separately).
    """

    @property
    def active_associations(self) -> list[Association]:
        return [
            a for a in super().active_associations
            if not (isinstance(a, _Association) and a.dul.pending)
        ]


class SharedSocketServer(ThreadedAssociationServer):
    """pynetdicom's threaded server around an already listening (maybe shared) socket.

    Parameters
    ----------
    listening
        The listening socket (maybe inherited over ``fork`` by *processes* processes).
    ae
        The configured AE: title, supported contexts, limits and timeouts.
    store
        Called in the DUL thread for each C-STORE the fast path serves.
    oversized
        Called in the DUL thread for a C-STORE whose data set exceeded
        ``limits.max_instance`` (discarded as it arrived).
    limits
        This process's share of the per-connection limits (:class:`Limits`).
    handlers
        pynetdicom event handlers bound to every association (policy: access control,
        C-ECHO, the C-STOREs the fast path leaves to pynetdicom, statistics).
    processes
        How many processes accept on *listening* (see :meth:`get_request`).
    """

    daemon_threads = True

    def __init__(
        self,
        listening: socket.socket,
        ae: AE,
        *,
        store: StoreFunc,
        oversized: OversizedFunc,
        limits: Limits,
        handlers: list[evt.EventHandlerType],
        processes: int = 1,
    ) -> None:
        self._listening = listening
        self.store = store
        self.oversized = oversized
        self.limits = limits
        self.processes = processes
        self._accepted: deque[float] = deque()  # when recent connections were accepted
        super().__init__(
            ae,
            listening.getsockname(),
            str(ae.ae_title),
            ae.supported_contexts,
            None,
            handlers,
            request_handler=_FastRequestHandler,
        )

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listening
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        # Every process wakes for a new connection and the first to accept() wins, so the
        # process already serving associations (awake, its accept thread hot) tends to win
        # them all while the others idle: four associations from four storescu processes
        # were measured landing on one of two processes. A process that is busy therefore
        # lets the others go first: it waits a little per association it serves, then
        # tries; if an idler process took the connection meanwhile, accept() raises
        # BlockingIOError and socketserver moves on.
        if self.processes > 1:
            # Associations just accepted may not have started their thread yet: count them.
            now = time.monotonic()
            while self._accepted and now - self._accepted[0] > _ACCEPT_RECENT:
                self._accepted.popleft()
            busy = max(len(self.active_associations), len(self._accepted))
            if busy:
                time.sleep(min(_ACCEPT_YIELD * busy, _ACCEPT_YIELD_MAX))
        assert self.socket is not None
        client, address = self.socket.accept()  # BlockingIOError when another process won
        self._accepted.append(time.monotonic())
        client.setblocking(True)
        set_nodelay(client)
        self._make_room()
        return client, address

    def pending(self) -> list[_Association]:
        """This process's connections that have not sent their A-ASSOCIATE-RQ yet."""
        return [
            a for a in self.active_associations
            if isinstance(a, _Association) and a.dul.pending
        ]

    def _make_room(self) -> None:
        """Keep at most ``limits.max_pending - 1`` unassociated connections before the one
        just accepted joins them: the oldest are closed. A real peer sends its A-ASSOCIATE-RQ
        within milliseconds of connecting, so it is almost never the oldest; connections that
        trickle or withhold their request cannot hold the port, nor (they are not counted
        against it) the association limit."""
        pending = self.pending()
        excess = len(pending) - (self.limits.max_pending - 1)
        if excess <= 0:
            return
        pending.sort(key=lambda a: a.dul.connected_at)
        for assoc in pending[:excess]:
            assoc.dul.evicted = True
            assoc.dul.close_transport()
        logger.warning(
            "closed %d connection(s) that had not associated yet (at most %d may wait)",
            excess, self.limits.max_pending,
        )

    def stop(self, grace: float, *, idle: float = 2.0) -> int:
        """Stop accepting and end every connection within about *grace* seconds; return how
        many associations had to be aborted.

        Connections that have not associated are closed at once; an association is given up
        to *grace* to finish, but one that has received nothing for *idle* seconds (and is not
        handling a store) is aborted then: whatever the peers do, this returns within *grace*
        plus a second or so.
        """
        self.shutdown()
        for assoc in self.pending():
            assoc.dul.evicted = True
            assoc.dul.close_transport()
        aborted: set[int] = set()
        deadline = time.monotonic() + grace
        while True:
            active = [a for a in self.active_associations if isinstance(a, _Association)]
            now = time.monotonic()
            stalled = [
                a for a in active
                if id(a) not in aborted and (
                    now >= deadline
                    or (not a.dul.busy and not a.dul.pending and now - a.dul.last_progress > idle)
                )
            ]
            for assoc in stalled:
                aborted.add(id(assoc))
                _abort_now(assoc)
            if not active or now >= deadline + 1.0:
                break
            time.sleep(0.05)
        return len(aborted)

    def server_close(self) -> None:
        # Close this process's descriptor only: shutdown() would stop the shared socket for
        # every process.
        if self.socket is not None:
            self.socket.close()


