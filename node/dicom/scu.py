"""The SCU side: C-ECHO a peer (and, in a later issue, send results back with C-STORE).

Every function here that builds an ``AE`` first applies the node's pynetdicom set-up
(:func:`node.dicom.configure.configure_pynetdicom`) and binds :data:`node.dicom.sockets.
SCU_HANDLERS` (``TCP_NODELAY``) to the association it requests.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom.configure import configure_pynetdicom
from node.dicom.sockets import SCU_HANDLERS
from node.errors import NetworkError

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


def echo(peer: PeerAddress, *, calling_ae: str, timeout: float = 10.0) -> float:
    """C-ECHO *peer*; return the round trip in seconds or raise :class:`NetworkError`."""
    configure_pynetdicom()
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    started = time.monotonic()
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=SCU_HANDLERS
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise NetworkError(f"{peer.ae_title}@{peer.host}:{peer.port} rejected the association")
        raise NetworkError(f"cannot associate with {peer.ae_title}@{peer.host}:{peer.port}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or int(status.Status) != 0:
        code = int(status.Status) if status else None
        raise NetworkError(f"C-ECHO to {peer.ae_title} failed (status {code})")
    return time.monotonic() - started
