"""Enrollment of the node in a federation: its EC P-384 key pair, the federation record and
the list of app bundles (FAB hashes) the node's admin approved.

Everything lives under ``<data_dir>/federation/`` (mode 0700):

- ``node_key`` / ``node_key.pub``: the SuperNode authentication key pair, OpenSSH format
  (private key 0600). The coordinator registers the public key with ``flwr supernode
  register``; with ``--enable-supernode-auth`` the SuperLink refuses any other node.
- ``ca.pem``: the federation's TLS root certificate (a copy, so the node does not depend on
  where the operator kept it).
- ``enrollment.json``: SuperLink address, site name, key fingerprint, enrollment time.
- ``approved.json``: approved FAB hashes (SHA-256 of the bundle bytes, as Flower computes
  ``Fab.hash_str``) with when they were approved and the file name they came from.

No secret of the node's data (master secret, site key) is involved: the authentication key is
separate and can be revoked by removing it here and deregistering it on the SuperLink.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from node.config import Settings
from node.errors import NodeError
from storage.files import atomic_write

HASH_RE = re.compile(r"^[0-9a-f]{64}$")
ADDRESS_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


class FederationError(NodeError):
    """The federation command cannot proceed."""


@dataclass(frozen=True)
class FederationPaths:
    """Where the node keeps its federation material."""

    root: Path

    @classmethod
    def of(cls, settings: Settings) -> FederationPaths:
        return cls(settings.data_dir / "federation")

    @property
    def private_key(self) -> Path:
        return self.root / "node_key"

    @property
    def public_key(self) -> Path:
        return self.root / "node_key.pub"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def enrollment(self) -> Path:
        return self.root / "enrollment.json"

    @property
    def approvals(self) -> Path:
        return self.root / "approved.json"

    @property
    def supervisor_state(self) -> Path:
        return self.root / "supervisor.json"

    @property
    def log(self) -> Path:
        return self.root / "supernode.log"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the node's Flower processes (installed bundles live here)."""
        return self.root / "flwr"


@dataclass(frozen=True)
class Enrollment:
    """The federation this node is enrolled in."""

    superlink: str
    name: str
    fingerprint: str
    public_key: str
    enrolled_at: str

    def register_command(self, paths: FederationPaths, connection: str = "<connection>") -> str:
        """The command the coordinator runs to register this node."""
        return f"flwr supernode register {paths.public_key.name} {connection} --name {self.name}"


def fingerprint(public_key_line: str) -> str:
    """OpenSSH-style fingerprint ``SHA256:<base64>`` of an OpenSSH public key line."""
    blob = base64.b64decode(public_key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def check_address(address: str) -> str:
    """Validate ``HOST:PORT``.

    Raises
    ------
    FederationError
        If *address* is not ``HOST:PORT`` with a port in 1-65535 (no URL scheme).
    """
    m = ADDRESS_RE.match(address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise FederationError(
            f"--superlink must be HOST:PORT (for example fl.example.org:9092), got {address!r}"
        )
    return address


def enroll(
    settings: Settings, superlink: str, ca_cert: Path, name: str | None, *, force: bool = False
) -> Enrollment:
    """Create the node's key pair and record the federation.

    Raises
    ------
    FederationError
        If the node is already enrolled (and not *force*), the address is malformed or the CA
        certificate is unreadable or not PEM.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_address(superlink)
    paths = FederationPaths.of(settings)
    if paths.private_key.exists() and not force:
        raise FederationError(
            "this node is already enrolled; run `fednode federation leave` first "
            "(or pass --force to replace its key, which must then be registered again)"
        )
    try:
        pem = ca_cert.read_bytes()
        x509.load_pem_x509_certificates(pem)
    except (OSError, ValueError) as exc:
        raise FederationError(
            f"--ca-cert {ca_cert}: not a readable PEM certificate ({type(exc).__name__})"
        ) from exc
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(paths.root, 0o700)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    site = name or settings.node.ae_title.lower()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
        + f" fednode-{site}"
    )
    atomic_write(paths.private_key, private, mode=0o600)
    atomic_write(paths.public_key, (public + "\n").encode(), mode=0o644)
    atomic_write(paths.ca_cert, pem, mode=0o644)
    record = Enrollment(
        superlink=superlink,
        name=site,
        fingerprint=fingerprint(public),
        public_key=public,
        enrolled_at=datetime.now(UTC).isoformat(),
    )
    atomic_write(
        paths.enrollment, (json.dumps(asdict(record), indent=2) + "\n").encode(), mode=0o600
    )
    return record


def load_enrollment(settings: Settings) -> Enrollment:
    """The node's enrollment.

    Raises
    ------
    FederationError
        If the node is not enrolled.
    """
    paths = FederationPaths.of(settings)
    try:
        data = json.loads(paths.enrollment.read_text())
    except (OSError, ValueError):
        raise FederationError(
            "this node is not enrolled in a federation; run `fednode federation enroll`"
        ) from None
    if not paths.private_key.exists():
        raise FederationError("the node's federation key is missing; enroll again")
    return Enrollment(**data)


def leave(settings: Settings) -> list[Path]:
    """Remove the node's key material and enrollment record; return what was removed.

    Approvals are kept (they are the admin's decisions, not key material); installed bundles
    under the node's FLWR_HOME are removed.
    """
    paths = FederationPaths.of(settings)
    removed = []
    for path in (paths.private_key, paths.public_key, paths.enrollment, paths.ca_cert):
        if path.exists():
            path.unlink()
            removed.append(path)
    if paths.flwr_home.exists():
        shutil.rmtree(paths.flwr_home)
        removed.append(paths.flwr_home)
    return removed


# --- approvals ---------------------------------------------------------------------------------


def bundle_hash(bundle: Path) -> str:
    """SHA-256 of a FAB file, as Flower computes its hash."""
    return hashlib.sha256(bundle.read_bytes()).hexdigest()


def load_approvals(path: Path) -> dict[str, dict[str, str]]:
    """The approved FAB hashes (empty when none)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise FederationError(f"{path} is unreadable: {type(exc).__name__}") from exc
    if not isinstance(data, dict) or not all(HASH_RE.match(k) for k in data):
        raise FederationError(f"{path} is not an approvals file")
    return data


def is_approved(path: Path, fab_hash: str) -> bool:
    """Whether *fab_hash* is approved (an unreadable file approves nothing)."""
    try:
        return fab_hash in load_approvals(path)
    except FederationError:
        return False


def approve(settings: Settings, target: str, *, note: str = "") -> tuple[str, str]:
    """Approve a bundle file or a FAB hash; return ``(hash, source)``.

    Raises
    ------
    FederationError
        If *target* is neither a readable file nor a 64-digit hex SHA-256.
    """
    path = Path(target)
    if path.is_file():
        digest, source = bundle_hash(path), path.name
    elif HASH_RE.match(target.lower()):
        digest, source = target.lower(), "hash"
    else:
        raise FederationError(
            f"{target!r} is neither a bundle file (.fab) nor a SHA-256 hash (64 hex digits)"
        )
    paths = FederationPaths.of(settings)
    paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    approvals = load_approvals(paths.approvals)
    approvals[digest] = {
        "approved_at": datetime.now(UTC).isoformat(),
        "source": source,
        "note": note,
    }
    atomic_write(paths.approvals, (json.dumps(approvals, indent=2) + "\n").encode(), mode=0o600)
    return digest, source


def revoke(settings: Settings, digest: str) -> bool:
    """Withdraw an approval; return whether it existed."""
    paths = FederationPaths.of(settings)
    approvals = load_approvals(paths.approvals)
    if approvals.pop(digest.lower(), None) is None:
        return False
    atomic_write(paths.approvals, (json.dumps(approvals, indent=2) + "\n").encode(), mode=0o600)
    return True
