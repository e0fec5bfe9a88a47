"""The node's master secret and the keys derived from it (HKDF-SHA256).

The master secret is 32 random bytes in a file readable only by the node's user (mode 0600).
Every key the node uses is derived from it with a distinct HKDF ``info`` label, so one secret
file is all an operator backs up, and no key is ever stored next to the data it protects.
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from node.errors import SecretError

SECRET_BYTES = 32
_SALT = b"fednode/v1"


def derive_key(master: bytes, label: str, length: int = 32) -> bytes:
    """Derive a sub-key of *length* bytes for *label* from the master secret (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=label.encode()).derive(
        master
    )


@dataclass(frozen=True, repr=False)
class NodeKeys:
    """The keys one node uses; ``repr`` never shows key material."""

    spool: bytes
    """AES-256-GCM key of the encrypted spool (raw received bytes)."""
    vault: bytes
    """AES-256-GCM key of the vault (original headers needed to file results back)."""
    site: bytes
    """HMAC-SHA256 key of the keyed pseudonyms (UIDs, patient tokens, date offsets)."""
    outbox: bytes
    """AES-256-GCM key of the outbox (re-identified Structured Reports until acknowledged)."""
    he: bytes
    """AES-256-GCM key that seals the CKKS secret keys (:mod:`node.inference.keystore`)."""
    blobs: bytes
    """AES-256-GCM key of the blob store's packs (de-identified instances)."""

    @classmethod
    def from_master(cls, master: bytes) -> NodeKeys:
        """Derive every key from *master*."""
        if len(master) != SECRET_BYTES:
            raise SecretError(f"the master secret must be {SECRET_BYTES} bytes, not {len(master)}")
        return cls(
            spool=derive_key(master, "spool/aes-gcm"),
            vault=derive_key(master, "vault/aes-gcm"),
            site=derive_key(master, "pseudonym/hmac-sha256"),
            outbox=derive_key(master, "outbox/aes-gcm"),
            he=derive_key(master, "he/ckks-secret/aes-gcm"),
            blobs=derive_key(master, "blobs/aes-gcm"),
        )

    def __repr__(self) -> str:
        return "NodeKeys(<redacted>)"


def create_master_secret(path: Path) -> None:
    """Write a new master secret to *path* with mode 0600; refuse to overwrite one.

    Raises
    ------
    SecretError
        If *path* exists already (overwriting it would orphan every encrypted item and change
        every pseudonym).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SecretError(
            f"a master secret already exists at {path}; fednode never overwrites it "
            "(every encrypted item and pseudonym depends on it)"
        ) from exc
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)


def load_master_secret(path: Path) -> bytes:
    """Read the master secret at *path*, checking its size and permissions."""
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise SecretError(
            f"no master secret at {path}; run `fednode init` or set node.secret_file"
        ) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"the master secret {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); fix: chmod 600 {path}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecretError(f"cannot read the master secret {path}: {exc.strerror}") from exc
    if len(data) != SECRET_BYTES:
        raise SecretError(f"the master secret {path} must hold {SECRET_BYTES} bytes")
    return data


def load_keys(path: Path) -> NodeKeys:
    """Load the master secret at *path* and derive the node's keys."""
    return NodeKeys.from_master(load_master_secret(path))
