"""Keyed, deterministic, stateless pseudonyms (PS3.15 Annex E; design: "the PHI boundary").

The same input always maps to the same pseudonym on one node (re-sends and later studies of a
patient link up) and never across nodes (each node has its own site key). Unkeyed hashes are
open to dictionary attacks; every function here is an HMAC-SHA256 under the site key.
"""

from __future__ import annotations

import hashlib
import hmac

UID_ROOT = "2.25."
"""PS3.5 B.2: a UID derived from a 128-bit number, written in decimal under the root 2.25."""


def _mac(site_key: bytes, domain: str, value: str) -> bytes:
    return hmac.new(site_key, f"{domain}\x00{value}".encode(), hashlib.sha256).digest()


def uid_pseudonym(site_key: bytes, uid: str) -> str:
    """Return ``2.25.<int>`` from the first 128 bits of HMAC-SHA256(site key, *uid*).

    128 bits keep the result within the 64-character UID limit (at most 5 + 39 characters) with
    the collision resistance of a UUID.
    """
    digest = _mac(site_key, "uid", uid.strip().rstrip("\x00"))
    return UID_ROOT + str(int.from_bytes(digest[:16], "big"))


def token(site_key: bytes, domain: str, value: str, *, length: int = 16) -> str:
    """A keyed hexadecimal token of *value* in *domain* (for example ``"patient-id"``)."""
    return _mac(site_key, domain, value.strip()).hex()[:length].upper()
