"""AES-256-GCM sealing of small items at rest: ``nonce (12 bytes) ‖ ciphertext ‖ tag``.

The vault's records, the outbox's Structured Reports and the node's sealed CKKS keys use it,
each under its own key derived from the master secret, with the item's name or key as the
authenticated data, so that a sealed item moved under another name fails authentication. The
receive spool has a record format of its own (a header and the record's place in its segment
are authenticated too; see :mod:`storage.spool`).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import IntegrityError

NONCE_BYTES = 12


def seal(key: bytes, aad: str, plaintext: bytes) -> bytes:
    """Encrypt *plaintext* under *key* with a fresh random nonce; *aad* is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad.encode())


def unseal(key: bytes, aad: str, blob: bytes) -> bytes:
    """Decrypt an item :func:`seal` wrote under the same *key* and *aad*.

    Raises
    ------
    IntegrityError
        If authentication fails (wrong key, another *aad*, tampered or truncated bytes).
    """
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad.encode())
    except (InvalidTag, ValueError) as exc:
        raise IntegrityError("a sealed item failed authentication (wrong key or tampered)") from exc
