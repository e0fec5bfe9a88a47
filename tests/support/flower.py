"""A real Flower deployment on loopback for tests: a throw-away CA, a TLS SuperLink with
SuperNode authentication, and the coordinator's ``flwr`` CLI configuration."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from node.federated.env import flower_env
from tests.support.node import free_port

REPO = Path(__file__).resolve().parents[2]


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednode test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
    )
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_path, 0o600)
    return ca_path, cert_path, key_path


@dataclass
class Coordinator:
    """A running SuperLink and the ``flwr`` CLI configured for it (connection ``fed``)."""

    root: Path
    port: int
    ca: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return flower_env(
            FLWR_HOME=str(self.root / "flwr-home"),
            PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)),
        )

    def flwr(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["flwr", *args],
            env={**self.env(), "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"flwr {' '.join(args)}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_coordinator(root: Path, timeout: float = 60) -> Coordinator:
    """Start ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on a free port."""
    ca, cert, key = make_tls(root / "tls")
    port = free_port()
    home = root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "fed"\n\n'
        f'[superlink.fed]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    log = root / "superlink.log"
    env = flower_env(FLWR_HOME=str(home), PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)))
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                "flower-superlink",
                "--ssl-ca-certfile",
                str(ca),
                "--ssl-certfile",
                str(cert),
                "--ssl-keyfile",
                str(key),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--database",
                str(root / "state.db"),
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=root,
        )
    coord = Coordinator(root, port, ca, proc, log)
    deadline = time.monotonic() + timeout
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return coord
        except OSError:
            time.sleep(0.3)
    coord.stop()
    raise RuntimeError(f"flower-superlink did not listen:\n{log.read_text()[-3000:]}")
