"""The master secret's key check value: proof that a secret is the one a database belongs to.

Every pseudonym and every encrypted item of a node depends on its master secret. A different
(valid) secret against an existing database would be accepted silently: pseudonyms would no
longer link up, labels would match nothing and the spool and vault could not be read. So
``fednode init`` stores a *key check value* in the database (table ``node_meta``), and the node
refuses to start when its secret does not reproduce it.

The value is ``HMAC-SHA256(K, "fednode master secret key check v1")`` with ``K`` derived from
the master secret by HKDF under its own label (:func:`node.keys.derive_key`). It is neither a
key nor a hash of a key that is used for anything else: from it no key can be recovered, and
it is safe to print, write in the admin's backup records and compare by eye
(:func:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from enum import StrEnum

from sqlalchemy import select

from node.errors import SecretError
from node.keys import derive_key
from storage.db import Database
from storage.models import NodeMeta

logger = logging.getLogger(__name__)

META_NAME = "master_secret_check"
"""The ``node_meta`` row holding the key check value (hex)."""
_LABEL = "key-check/hmac-sha256"
_MESSAGE = b"fednode master secret key check v1"


def key_check_value(master: bytes) -> str:
    """The key check value of *master*, as 64 hex digits."""
    return hmac.new(derive_key(master, _LABEL), _MESSAGE, hashlib.sha256).hexdigest()


def fingerprint(check_value: str) -> str:
    """The first 128 bits of a key check value in groups of four, for people to compare."""
    head = check_value[:32]
    return "-".join(head[i : i + 4] for i in range(0, len(head), 4))


def stored_check_value(db: Database) -> str | None:
    """The key check value recorded in *db*, or ``None`` if there is none yet."""
    with db.session() as s:
        return s.execute(select(NodeMeta.value).where(NodeMeta.name == META_NAME)).scalar()


def record_check_value(db: Database, master: bytes) -> None:
    """Record *master*'s key check value in *db* unless one is recorded (never replaces it)."""
    with db.session() as s:
        if s.get(NodeMeta, META_NAME) is None:
            s.add(NodeMeta(name=META_NAME, value=key_check_value(master)))


class KeyCheck(StrEnum):
    """What :func:`verify_master_secret` found."""

    MATCH = "match"
    RECORDED = "recorded"
    """No value was recorded; the secret's value has been recorded now."""
    UNRECORDED = "unrecorded"
    """No value is recorded (and the caller asked not to record one)."""


def verify_master_secret(db: Database, master: bytes, *, record: bool = True) -> KeyCheck:
    """Check that *master* is the secret *db* was initialised with.

    Raises
    ------
    SecretError
        If the database holds the key check value of another secret.
    """
    expected = stored_check_value(db)
    actual = key_check_value(master)
    if expected is None:
        if not record:
            return KeyCheck.UNRECORDED
        record_check_value(db, master)
        logger.info("recorded the master secret's key check value (fingerprint %s)",
                    fingerprint(actual))
        return KeyCheck.RECORDED
    if not hmac.compare_digest(expected, actual):
        raise SecretError(
            f"the master secret (fingerprint {fingerprint(actual)}) is not the one this "
            f"database was initialised with (fingerprint {fingerprint(expected)}): every "
            "pseudonym would change and nothing encrypted could be read; fix: restore the "
            "node's original secret from its backup (check it with `fednode secret "
            "fingerprint --file FILE`) and point node.secret_file at it"
        )
    return KeyCheck.MATCH
