"""The storage SCP's policy: Verification and C-STORE over pynetdicom, default-deny peers.

Thin by design (house style 1): the C-STORE handler runs in the association thread before the
response is sent, so it only hands the received bytes to :class:`~node.dicom.receive.Receiver`
and maps the outcome to a status from :class:`~node.dicom.status.Status`.

This module is the node's policy only: which peers may associate (AE title and host pins,
default deny), the audit records of rejected associations and of what each association
delivered, the per-association statistics. The layers below it are in their own modules:
:mod:`node.dicom.configure` (pynetdicom's set-up, applied when a :class:`StorageSCP` is built),
:mod:`node.dicom.sockets` (listening socket, ``TCP_NODELAY``) and :mod:`node.dicom.fastpath`
(the PS3.8 data phase that replaces pynetdicom's acceptor internals, and the server around a
shared listening socket).

Several SCP processes may serve one port: each builds a :class:`StorageSCP` around the same
listening socket (inherited over ``fork``) and the kernel gives each connection to one of them.
pynetdicom's identifier logging is switched off; nothing here logs a patient identifier.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from node.config import Peer, Settings
from node.dicom.configure import configure_pynetdicom
from node.dicom.contexts import supported_contexts
from node.dicom.fastpath import AcceptorAE, Limits, SharedSocketServer, StoreRequest
from node.dicom.receive import Receiver
from node.dicom.status import Status
from storage.audit import AuditKind

logger = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, source 1 = service user.
_REJECT_PERMANENT, _SOURCE_USER = 0x01, 0x01
_CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x03, 0x07


def ae_title_text(value: str | bytes | None) -> str:
    """An AE title as the node logs and audits it: at most 16 characters of printable ASCII
    (PS3.5 6.2: the default repertoire without control characters), anything else as ``?``,
    so a title with a line break is one log line."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    text = (value or "").strip(" \x00\t\r\n")[:16]
    return "".join(c if " " <= c <= "~" else "?" for c in text)


@dataclass
class _AssocStats:
    calling_ae: str
    received: int = 0
    duplicates: int = 0
    failed: int = 0
    studies: Counter[str] = field(default_factory=Counter)


class StorageSCP:
    """One process's SCP: access control, C-ECHO, C-STORE into a :class:`Receiver`."""

    def __init__(self, settings: Settings, receiver: Receiver, *, processes: int = 1) -> None:
        self.settings = settings
        self.receiver = receiver
        self.ae_title = settings.node.ae_title
        self.processes = processes
        self._peers: dict[str, list[Peer]] = {}
        for peer in settings.dicom.peers:
            self._peers.setdefault(peer.ae_title, []).append(peer)
        self._peer_ips: dict[str, set[str]] = {}
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        configure_pynetdicom()
        self.ae = self._build_ae(processes)
        self.server: SharedSocketServer | None = None

    def _build_ae(self, processes: int) -> AE:
        cfg = self.settings.dicom
        ae = AcceptorAE(ae_title=self.ae_title)
        ae.supported_contexts = supported_contexts()
        ae.maximum_pdu_size = cfg.max_pdu
        ae.acse_timeout = cfg.acse_timeout
        ae.dimse_timeout = cfg.dimse_timeout
        ae.network_timeout = cfg.network_timeout
        ae.maximum_associations = max(1, -(-cfg.max_associations // max(processes, 1)))
        return ae

    def limits(self) -> Limits:
        """This process's share of the per-connection limits ([dicom])."""
        cfg = self.settings.dicom
        return Limits(
            first_pdu_timeout=cfg.first_pdu_timeout,
            pdu_timeout=cfg.pdu_timeout,
            max_pending=max(1, -(-cfg.pending_connections // max(self.processes, 1))),
            max_instance=cfg.max_instance_mb << 20,
        )

    # -- access control -----------------------------------------------------------------------
    def _resolve(self, host: str) -> set[str]:
        ips = self._peer_ips.get(host)
        if ips is None:
            try:
                ips = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
            except OSError:
                ips = set()
            ips.add(host)
            self._peer_ips[host] = ips
        return ips

    def peer_allowed(self, calling_ae: str, address: str) -> bool:
        """Default-deny: *calling_ae* must be configured, and from its pinned host if any."""
        # A title with characters ae_title_text replaces matches no configured peer.
        for peer in self._peers.get(calling_ae.strip(), []):
            if peer.host is None or address in self._resolve(peer.host):
                return True
        return False

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        assert rq is not None  # EVT_REQUESTED: the A-ASSOCIATE-RQ has been received
        calling = ae_title_text(rq.calling_ae_title)
        called = ae_title_text(rq.called_ae_title)
        address = assoc.requestor.address
        diagnostic = None
        if called != self.ae_title:
            diagnostic, reason = _CALLED_AE_NOT_RECOGNISED, "called AE title not recognised"
        elif not self.peer_allowed(calling, address):
            diagnostic, reason = _CALLING_AE_NOT_RECOGNISED, "calling AE title or host not allowed"
        if diagnostic is None:
            return
        logger.warning(
            "association rejected: calling_ae=%s called_ae=%s address=%s reason=%s",
            calling, called, address, reason,
        )
        from node.audit import audit

        audit(
            self.receiver.db, self.receiver.data_dir, AuditKind.ASSOCIATION_REJECTED,
            outcome="failure", actor=calling, called_ae=called, address=address,
            reason=reason,
        )
        assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_USER, diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    # -- services -----------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset:
        """EVT_C_STORE: a C-STORE the fast path left to pynetdicom."""
        request = cast(C_STORE, event.request)
        status, comment = self.store(
            event.assoc,
            lambda: request.DataSet.getvalue() if request.DataSet is not None else b"",
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(request.AffectedSOPClassUID or ""),
            sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
        )
        rsp = Dataset()
        rsp.Status = int(status)
        if comment:
            rsp.ErrorComment = comment[:64]
        return rsp

    def store_fast(self, assoc: Any, request: StoreRequest, raw: memoryview) -> tuple[int, str]:
        """A C-STORE served by the fast path (in the DUL thread)."""
        status, comment = self.store(
            assoc,
            lambda: raw,
            transfer_syntax=request.transfer_syntax,
            sop_class_uid=request.sop_class_uid,
            sop_instance_uid=request.sop_instance_uid,
        )
        return int(status), comment

    def store_oversized(self, assoc: Any, request: StoreRequest, size: int) -> tuple[int, str]:
        """A C-STORE whose data set exceeded ``[dicom] max_instance_mb`` (the fast path
        discarded it as it arrived): refused with an audit record."""
        outcome = self.receiver.refuse_oversized(ae_title_text(assoc.requestor.ae_title), size)
        self._stats_for(assoc).failed += 1
        return int(outcome.status), outcome.comment

    def store(
        self,
        assoc: Any,
        raw: Callable[[], bytes | memoryview],
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> tuple[Status, str]:
        """Keep one received data set through the :class:`Receiver`; return the status and
        error comment to answer (never raises: no traceback, and no PHI, reaches the peer)."""
        calling = ae_title_text(assoc.requestor.ae_title)
        try:
            outcome = self.receiver.store(
                raw(),
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                calling_ae=calling,
            )
            status, comment = outcome.status, outcome.comment
        except Exception as exc:
            logger.error("C-STORE handler failed: %s", type(exc).__name__)
            status, comment = Status.PROCESSING_FAILURE, "internal error; nothing was kept"
            outcome = None
        stats = self._stats_for(assoc)
        if status is Status.SUCCESS and outcome is not None:
            if outcome.duplicate:
                stats.duplicates += 1
            else:
                stats.received += 1
            if outcome.study_key:
                stats.studies[outcome.study_key] += 1
        else:
            stats.failed += 1
        return status, comment

    def _stats_for(self, assoc: Any) -> _AssocStats:
        key = id(assoc)
        with self._lock:
            stats = self._stats.get(key)
            if stats is None:
                stats = self._stats[key] = _AssocStats(ae_title_text(assoc.requestor.ae_title))
            return stats

    def _on_conn_close(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None or not (stats.received or stats.duplicates or stats.failed):
            return
        logger.info(
            "association closed: calling_ae=%s received=%d duplicates=%d failed=%d studies=%d",
            stats.calling_ae, stats.received, stats.duplicates, stats.failed, len(stats.studies),
        )
        from node.audit import audit

        audit(
            self.receiver.db, self.receiver.data_dir, AuditKind.INSTANCE_RECEIVED,
            outcome="success" if not stats.failed else "partial", actor=stats.calling_ae,
            received=stats.received, duplicates=stats.duplicates, failed=stats.failed,
            studies=dict(stats.studies),
        )

    def handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    # -- running ------------------------------------------------------------------------------
    def serve(self, listening: socket.socket) -> None:
        """Serve associations on *listening* until :meth:`stop` is called (blocks)."""
        self.server = SharedSocketServer(
            listening, self.ae, store=self.store_fast, oversized=self.store_oversized,
            limits=self.limits(), handlers=self.handlers(), processes=self.processes,
        )
        self.ae._servers.append(self.server)
        self.server.serve_forever(poll_interval=0.2)

    def stop(self, grace: float) -> int:
        """Stop accepting and end every connection within about *grace* seconds; return how
        many associations had to be aborted (see :meth:`SharedSocketServer.stop`: connections
        not yet associated are closed at once, idle associations aborted)."""
        server = self.server
        if server is None:
            return 0
        return server.stop(grace)
