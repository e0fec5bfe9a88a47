"""The SCU side: C-ECHO a peer, and C-STORE the node's Structured Reports to the PACS.

Every function here that builds an ``AE`` first applies the node's pynetdicom set-up
(:func:`node.dicom.configure.configure_pynetdicom`) and binds :data:`node.dicom.sockets.
SCU_HANDLERS` (``TCP_NODELAY``) to the association it requests.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation, AssociationSocket

from node.dicom.configure import configure_pynetdicom
from node.dicom.sockets import SCU_HANDLERS
from node.errors import DicomError, NetworkError

logger = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class PeerAddress:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parse ``AE@HOST:PORT``."""
        m = _ADDRESS.match(text.strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise NetworkError(f"{text!r} is not AE@HOST:PORT (for example PACS@10.0.0.5:104)")
        return cls(m["ae"], m["host"].strip("[]"), int(m["port"]))


def _rejection_reason(answers: list[Any]) -> str:
    """`` (<result>, <source>: <reason>)`` of an A-ASSOCIATE-RJ (PS3.8 9.3.4), if one came."""
    for primitive in answers:
        if getattr(primitive, "result", None) in (0x01, 0x02):
            try:
                return (
                    f" ({primitive.result_str}, {primitive.source_str}: "
                    f"{primitive.reason_str.lower()})"
                )
            except (KeyError, TypeError, ValueError):
                return ""
    return ""


class _ClosingSocket(AssociationSocket):
    """An association socket that is closed even when the connection was never made.

    pynetdicom's ``_shutdown_socket`` calls ``shutdown()`` first; on a socket whose connect
    failed (peer down) that raises, ``close()`` is skipped and the descriptor is left to the
    garbage collector: one leaked descriptor per failed attempt of an export that retries.
    """

    def _shutdown_socket(self) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class _AE(AE):
    """The node's requesting AE: its association sockets are always closed."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: object
    ) -> AssociationSocket:
        sock = _ClosingSocket(assoc, address=address)
        sock.tls_args = tls_args  # type: ignore[assignment]
        return sock


def echo(peer: PeerAddress, *, calling_ae: str, timeout: float = 10.0) -> float:
    """C-ECHO *peer*; return the round trip in seconds or raise :class:`NetworkError`."""
    configure_pynetdicom()
    ae = _AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    started = time.monotonic()
    answers: list[Any] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[
            *SCU_HANDLERS,
            (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive)),
        ],
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise NetworkError(
                f"{peer.ae_title}@{peer.host}:{peer.port} rejected the association from "
                f"calling AE {calling_ae!r}{_rejection_reason(answers)}"
            )
        raise NetworkError(f"cannot associate with {peer.ae_title}@{peer.host}:{peer.port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or int(status.Status) != 0:
        code = int(status.Status) if status else None
        raise NetworkError(f"C-ECHO to {peer.ae_title} failed (status {code})")
    return time.monotonic() - started


class StoreStatus(IntEnum):
    """C-STORE response statuses the SCU tells apart (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    COERCION_OF_DATA_ELEMENTS = 0xB000
    """Warning: stored, some elements coerced."""
    ELEMENTS_DISCARDED = 0xB006
    """Warning: stored, some elements discarded."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    """Warning: stored although the dataset does not match the SOP class."""


ACKNOWLEDGED = frozenset(int(s) for s in StoreStatus)
"""Statuses that mean the destination kept the instance (success and the storage warnings)."""


class StoreRefused(DicomError):
    """The destination answered the C-STORE with a failure status."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


class ContextRefused(DicomError):
    """The destination does not accept the SOP class (no presentation context accepted)."""


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    seconds: float


def store(
    peer: PeerAddress,
    part10: bytes,
    *,
    calling_ae: str,
    timeout: float = 30.0,
) -> StoreOutcome:
    """C-STORE one DICOM Part 10 object to *peer* over a fresh association.

    The bytes are decoded in memory only (no plaintext copy on disk: the SR is PHI). Every
    socket has TCP_NODELAY.

    Raises
    ------
    NetworkError
        The peer cannot be reached, rejects or aborts the association, or times out (worth
        retrying).
    ContextRefused
        The peer accepts no presentation context for the object's SOP class.
    StoreRefused
        The peer answered with a failure status (:attr:`StoreRefused.status`).
    """
    ds = dcmread(io.BytesIO(part10))
    sop_class = str(ds.SOPClassUID)
    configure_pynetdicom()
    ae = _AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    started = time.monotonic()
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=SCU_HANDLERS)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise NetworkError(f"{where} rejected the association")
        raise NetworkError(f"cannot associate with {where}")
    try:
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise ContextRefused(
                f"{where} accepts no presentation context for SOP class {sop_class}"
            )
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    if not status or "Status" not in status:
        raise NetworkError(f"{where} sent no C-STORE response (timeout or aborted)")
    code = int(status.Status)
    if code not in ACKNOWLEDGED:
        # The peer's Error Comment is not repeated: it could echo the SR's patient.
        raise StoreRefused(f"{where} refused the C-STORE with status 0x{code:04X}", code)
    return StoreOutcome(code, time.monotonic() - started)
