"""The node's CKKS keys: one per task and parameter set, sealed, rotated, kept by key id.

A key's secret part (the TenSEAL context with the secret key) is sealed with AES-256-GCM under
``NodeKeys.he`` (derived from the master secret, :mod:`node.keys`) with the key id as
associated data, and stored in ``he_keys``; it is never written in clear. A key is used for new
inputs until ``rotate_after`` (``[inference] key_rotation_days``), then retired and replaced;
a retired key stays, so results keep naming the key their input was encrypted under.

Two worker processes that find no key at once may both create one; both are valid, the newest
is used from then on.
"""

from __future__ import annotations

import logging
import secrets
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from node.errors import NodeError
from node.inference.ckks import SecretContext
from plugins.he import CKKSParameters
from storage.db import Database
from storage.errors import IntegrityError
from storage.models import HEKey
from storage.sealing import seal, unseal

logger = logging.getLogger(__name__)


class KeyStoreError(NodeError):
    """A CKKS key could not be found or unsealed."""


def _aad(key_id: str) -> str:
    return f"he-key:{key_id}"


class KeyStore:
    """Sealed CKKS keys in the node's database, with an in-process cache of unsealed ones."""

    def __init__(self, db: Database, seal_key: bytes, rotation: timedelta) -> None:
        self.db = db
        self._seal_key = seal_key
        self.rotation = rotation
        self._cache: dict[str, SecretContext] = {}
        self._lock = threading.Lock()

    def current(
        self, task: str, params: CKKSParameters, *, now: datetime | None = None
    ) -> tuple[str, SecretContext]:
        """The key to encrypt new inputs of *task* under *params* with; made or rotated here."""
        now = now or datetime.now(UTC)
        digest = params.digest()
        with self.db.session() as session:
            row = session.execute(
                select(HEKey.key_id, HEKey.rotate_after)
                .where(HEKey.task == task, HEKey.encoding == digest, HEKey.retired_at.is_(None))
                .order_by(HEKey.created_at.desc(), HEKey.key_id.desc())
                .limit(1)
            ).first()
        if row is not None and row.rotate_after > now:
            return row.key_id, self.get(row.key_id, params)
        key_id, secret = self._create(task, params, now)
        if row is not None:
            with self.db.session() as session:
                session.execute(
                    update(HEKey)
                    .where(HEKey.key_id == row.key_id, HEKey.retired_at.is_(None))
                    .values(retired_at=now)
                )
            logger.info("CKKS key %s of task %s retired (rotation)", row.key_id, task)
        return key_id, secret

    def _create(
        self, task: str, params: CKKSParameters, now: datetime
    ) -> tuple[str, SecretContext]:
        key_id = f"{task}-{params.digest()[:8]}-{secrets.token_hex(6)}"
        secret = SecretContext.create(params)
        sealed = seal(self._seal_key, _aad(key_id), secret.serialize_secret())
        with self.db.session() as session:
            session.add(
                HEKey(
                    key_id=key_id,
                    task=task,
                    encoding=params.digest(),
                    sealed_secret=sealed,
                    created_at=now,
                    rotate_after=now + self.rotation,
                )
            )
        with self._lock:
            self._cache[key_id] = secret
        logger.info(
            "CKKS key %s made for task %s (N=%d, scale 2^%d)",
            key_id,
            task,
            params.poly_modulus_degree,
            params.scale_bits,
        )
        return key_id, secret

    def get(self, key_id: str, params: CKKSParameters) -> SecretContext:
        """The unsealed key *key_id* (retired keys too)."""
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        with self.db.session() as session:
            sealed = session.execute(
                select(HEKey.sealed_secret).where(HEKey.key_id == key_id)
            ).scalar_one_or_none()
        if sealed is None:
            raise KeyStoreError(f"no CKKS key {key_id} on this node")
        try:
            plain = unseal(self._seal_key, _aad(key_id), sealed)
        except IntegrityError as exc:
            raise KeyStoreError(
                f"CKKS key {key_id} failed authentication (another master secret?)"
            ) from exc
        secret = SecretContext.from_secret(plain, params)
        with self._lock:
            self._cache[key_id] = secret
        return secret
