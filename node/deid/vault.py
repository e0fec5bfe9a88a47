"""The vault: the encrypted linkage from pseudonyms back to the original header.

PS3.15 E.1.1 lets a de-identifier keep what is needed to recover identity under control of
authorised personnel. fednode keeps the minimum needed to file a result back under the
original patient and study (design: "the PHI boundary"):

* per study (``vault_studies``, keyed by the pseudonymous Study Instance UID): the original
  Patient module (PS3.3 C.7.1.1) and General Study module (C.7.2.1) attributes, with the
  Specific Character Set needed to decode them;
* per instance (``vault_instances``, keyed by the pseudonymous SOP Instance UID): the original
  Study, Series and SOP Instance UIDs and the SOP Class UID.

Each record is AES-256-GCM under the node's vault key (:attr:`node.keys.NodeKeys.vault`), stored
as ``nonce (12 bytes) || ciphertext || tag`` with the record's pseudonymous key as associated
data, so a record copied onto another key fails authentication instead of decrypting. The
plaintext is the transfer syntax UID (length-prefixed) followed by the encoded elements, which
:func:`load_study` and :func:`load_instances` return as pydicom datasets.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from node.dicom.encoding import EXPLICIT_BE, IMPLICIT_LE
from node.errors import DeidError
from node.keys import NodeKeys
from storage.db import Database
from storage.models import VaultInstance, VaultStudy

logger = logging.getLogger(__name__)

NONCE_BYTES = 12


class VaultError(DeidError):
    """A vault record cannot be read (wrong key, tampered, or not a vault record)."""


def seal(key: bytes, aad: str, plaintext: bytes) -> bytes:
    """Encrypt *plaintext* with AES-256-GCM; *aad* (the record's key) is authenticated."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad.encode())


def unseal(key: bytes, aad: str, blob: bytes) -> bytes:
    """Decrypt a record written by :func:`seal` under the same *aad*."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad.encode())
    except (InvalidTag, ValueError) as exc:
        raise VaultError("a vault record failed authentication (wrong key or tampered)") from exc


def decode(plaintext: bytes) -> Dataset:
    """The dataset of a vault plaintext (transfer syntax prefix + encoded elements)."""
    if not plaintext:
        raise VaultError("empty vault record")
    size = plaintext[0]
    syntax = plaintext[1 : 1 + size].decode("ascii", "replace")
    body = plaintext[1 + size :]
    try:
        return read_dataset(
            io.BytesIO(body), syntax == IMPLICIT_LE, syntax != EXPLICIT_BE
        )
    except Exception as exc:  # pydicom raises a variety of errors on bad input
        raise VaultError("a vault record does not hold a readable dataset") from exc


def store(
    db: Database,
    session: Session,
    keys: NodeKeys,
    *,
    study_key: str,
    sop_key: str,
    study_plaintext: bytes,
    instance_plaintext: bytes,
) -> None:
    """Upsert the study and instance records in *session*'s transaction (a session of *db*).

    The study record is replaced by the newest instance's header (a re-sent study with a
    corrected name files results under the correction).
    """
    store_many(db, session, keys,
               [VaultRecords(study_key, sop_key, study_plaintext, instance_plaintext)])


@dataclass(frozen=True)
class VaultRecords:
    """The vault plaintexts of one de-identified instance (see :func:`store_many`)."""

    study_key: str
    sop_key: str
    study_plaintext: bytes
    instance_plaintext: bytes


def store_many(
    db: Database, conn: Session | Connection, keys: NodeKeys, records: Sequence[VaultRecords]
) -> None:
    """:func:`store` for several instances in one statement per table (``executemany``); of
    several instances of one study, the last one's header is the study's record."""
    if not records:
        return
    now = datetime.now(UTC)
    studies = {r.study_key: r for r in records}
    db.upsert_many(
        conn, VaultStudy,
        [{"study_key": k, "ciphertext": seal(keys.vault, k, r.study_plaintext), "updated_at": now}
         for k, r in studies.items()],
        key="study_key", update_from_row=("ciphertext", "updated_at"),
    )
    db.upsert_many(
        conn, VaultInstance,
        [{"sop_key": r.sop_key, "study_key": r.study_key,
          "ciphertext": seal(keys.vault, r.sop_key, r.instance_plaintext)} for r in records],
        key="sop_key", update_from_row=("ciphertext", "study_key"),
    )


def load_study(db: Database, keys: NodeKeys, study_key: str) -> Dataset | None:
    """The original Patient and General Study attributes of a study, or ``None``.

    Returns PHI: use it only to file a result back (SR re-identification), never log it.
    """
    with db.session() as session:
        blob = session.execute(
            select(VaultStudy.ciphertext).where(VaultStudy.study_key == study_key)
        ).scalar_one_or_none()
    if blob is None:
        return None
    return decode(unseal(keys.vault, study_key, blob))


def load_instances(db: Database, keys: NodeKeys, study_key: str) -> dict[str, Dataset]:
    """The original UIDs of every instance of a study, by pseudonymous SOP key.

    Each dataset holds SOPClassUID, SOPInstanceUID, StudyInstanceUID and SeriesInstanceUID.
    """
    with db.session() as session:
        rows = session.execute(
            select(VaultInstance.sop_key, VaultInstance.ciphertext)
            .where(VaultInstance.study_key == study_key)
            .order_by(VaultInstance.sop_key)
        ).all()
    return {sop_key: decode(unseal(keys.vault, sop_key, blob)) for sop_key, blob in rows}


def load_instance(db: Database, keys: NodeKeys, sop_key: str) -> Dataset | None:
    """The original UIDs of one instance, or ``None``."""
    with db.session() as session:
        blob = session.execute(
            select(VaultInstance.ciphertext).where(VaultInstance.sop_key == sop_key)
        ).scalar_one_or_none()
    if blob is None:
        return None
    return decode(unseal(keys.vault, sop_key, blob))
