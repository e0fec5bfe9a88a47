"""TCP socket helpers that the SCP and the SCU share.

pynetdicom never sets ``TCP_NODELAY``; without it a small PDU waits for the peer's delayed ACK
(measured: small objects crawl at ≈ 21/s). Every socket the node opens or accepts for DICOM goes
through :func:`set_nodelay`: the SCP's accepted sockets in
:meth:`node.dicom.fastpath.SharedSocketServer.get_request`, the SCU's through the
:data:`SCU_HANDLERS` bound to each association it requests.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import evt


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm: small PDUs otherwise wait for the peer's delayed ACK."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not a TCP socket (tests with socketpair)
        pass


def listen_socket(host: str, port: int, backlog: int = 64) -> socket.socket:
    """Bind and listen on (*host*, *port*); the socket may be shared by forked processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    # Several processes accept on this socket: the losers of a race must not block.
    sock.setblocking(False)
    return sock


def _nodelay_on_open(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        set_nodelay(sock.socket)


SCU_HANDLERS: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay_on_open)]
"""``evt_handlers`` for ``AE.associate``: sets ``TCP_NODELAY`` as soon as the SCU connects."""
