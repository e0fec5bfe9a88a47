"""The node's pynetdicom set-up, applied explicitly by every entry point that uses pynetdicom.

Importing a module of :mod:`node.dicom` changes nothing in pynetdicom. Whatever builds an
``AE`` (the SCP in :class:`node.dicom.scp.StorageSCP`, the SCU functions in
:mod:`node.dicom.scu`) first calls :func:`configure_pynetdicom`, which is idempotent and cheap
after the first call:

- pynetdicom never logs identifiers (the PHI boundary: PS3.15, DESIGN.md) and never spills a
  received data set to a temporary file (the node's own spool is the only place for it);
- pynetdicom's own logger is quiet below WARNING;
- its text → UID conversion (``set_uid``) is memoised (:func:`_memoize_uid_conversion`).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any

_lock = threading.Lock()
_configured = False


def configure_pynetdicom() -> None:
    """Apply the node's pynetdicom configuration (idempotent, thread-safe)."""
    global _configured
    if _configured:
        return
    with _lock:
        if _configured:
            return
        from pynetdicom import _config

        # pynetdicom must never log identifiers nor spill datasets to disk.
        _config.LOG_HANDLER_LEVEL = "none"
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        _config.STORE_RECV_CHUNKED_DATASET = False
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        _memoize_uid_conversion()
        _configured = True


def _memoize_uid_conversion() -> None:
    """Make pynetdicom's ``set_uid`` (text → validated UID) a cached lookup.

    Negotiating one association with DCMTK ``storescu`` (≈ 120 proposed presentation
    contexts) converts each abstract and transfer syntax several times, each time through
    pydicom's and pynetdicom's regular-expression validation: ≈ 60 % of the ≈ 13 ms of CPU an
    association costs before its first C-STORE. The same few hundred UIDs come back in every
    association, so the (pure) conversion is cached; invalid UIDs still raise every time
    (exceptions are not cached) and the cache is bounded.
    """
    import pynetdicom.dimse_primitives
    import pynetdicom.pdu_items
    import pynetdicom.pdu_primitives
    import pynetdicom.presentation
    import pynetdicom.utils

    original = pynetdicom.utils.set_uid
    if getattr(original, "_fednode_cached", False):
        return
    cached = functools.lru_cache(maxsize=4096)(original)

    def set_uid(
        value: Any,
        name: str,
        allow_empty: bool = True,
        allow_none: bool = True,
        validate: bool = True,
    ) -> Any:
        # Only the syntax UIDs repeat; SOP Instance UIDs would flush them from the cache (and
        # stay in memory).
        if isinstance(value, str | bytes) and "Instance" not in name:
            return cached(value, name, allow_empty, allow_none, validate)
        return original(value, name, allow_empty, allow_none, validate)

    set_uid._fednode_cached = True  # type: ignore[attr-defined]
    for module in (pynetdicom.utils, pynetdicom.pdu_items, pynetdicom.pdu_primitives,
                   pynetdicom.presentation, pynetdicom.dimse_primitives):
        module.set_uid = set_uid  # type: ignore[attr-defined]
