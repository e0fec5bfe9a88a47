"""Encrypted inference through the real service (``fednode inference-server`` on loopback).

One service process and one trained model for the module (CKKS is CPU-heavy); the node side
runs in the test process with a real SQLite key store. Covered: encrypted and plaintext
predictions agree on a held-out synthetic set (every label, probability error <= 1e-3); the
service refuses a context with a secret key, a wrong or missing token, an oversized or
malformed body, and keeps serving; what crosses the wire holds no pixel and no decrypted value;
over TLS, the node trusts the service only through the CA it is configured with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest

from node.inference import wire
from node.inference.client import EncryptedPredictor, ServiceClient, sigmoid
from node.inference.errors import ServiceUnavailable
from node.inference.keystore import KeyStore
from node.inference.service import TokenStore
from node.keys import NodeKeys
from plugins.base import TaskPlugin, resolve_task
from storage.db import Database
from tests.support.flower import make_tls
from tests.support.inference import RunningService, synthetic_inputs, train_artifact

pytestmark = pytest.mark.slow

MAX_BODY_MB = 8


@dataclass
class Setup:
    plugin: TaskPlugin
    artifact: Path
    service: RunningService
    token: str
    state: Path
    db: Database
    keys: NodeKeys


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("he")
    plugin = resolve_task("chest_xray")
    artifact = train_artifact(root / "models", plugin)
    state = root / "service"
    token = TokenStore(state).issue("node-a")
    db = Database(f"sqlite:///{root / 'node.db'}")
    db.upgrade()
    keys = NodeKeys.from_master(b"\x07" * 32)
    with RunningService(artifact, state, extra=("--max-body-mb", str(MAX_BODY_MB))) as service:
        yield Setup(plugin, artifact, service, token, state, db, keys)
    db.dispose()


_clients: list[ServiceClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Every service client a test opened is closed after it (its sockets included)."""
    yield
    while _clients:
        _clients.pop().close()


def predictor(s: Setup, *, token: str | None = None, transport=None) -> EncryptedPredictor:  # type: ignore[no-untyped-def]
    client = ServiceClient(s.service.url, token or s.token, transport=transport)
    _clients.append(client)
    return EncryptedPredictor(client, KeyStore(s.db, s.keys.he, timedelta(days=30)))


def plaintext_logits(s: Setup, inputs: np.ndarray) -> np.ndarray:
    import torch

    from node.tasks.training import load_artifact

    model, _ = load_artifact(s.artifact, s.plugin)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(inputs)).reshape(-1).double().numpy()


def test_encrypted_and_plaintext_agree_on_every_held_out_case(setup: Setup) -> None:
    inputs, _ = synthetic_inputs(setup.plugin, 10, seed=123)  # not the training seed
    pred = predictor(setup)
    results = pred.predict(setup.plugin, list(inputs[:4]))  # several studies, one request
    results += [pred.predict(setup.plugin, [x])[0] for x in inputs[4:]]
    logits = plaintext_logits(setup, inputs)
    probs = np.array([sigmoid(v) for v in logits])
    got = np.array([r.probability for r in results])
    assert np.max(np.abs(got - probs)) <= 1e-3, np.abs(got - probs)
    assert [r.label for r in results] == [setup.plugin.decide(p).name for p in probs]
    # the set is not degenerate: the model separates, the logits are not all tiny
    assert {r.label for r in results} == set(setup.plugin.class_names)
    r = results[0]
    assert r.model_id.startswith("chest_xray-1.0-") and r.key_id.startswith("chest_xray-")
    assert r.bytes_sent > 100_000 and r.bytes_received > 10_000
    assert set(r.timings) >= {"encode", "encrypt", "service", "evaluate", "decrypt"}


def test_the_service_refuses_bad_requests_and_keeps_serving(setup: Setup) -> None:
    url = setup.service.url
    auth = {"Authorization": f"Bearer {setup.token}"}
    assert httpx.get(url + "/v1/model").status_code == 401
    for bad in ("nope", "fnt.node-b.x", setup.token[:-4] + "AAAA"):
        r = httpx.get(url + "/v1/model", headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    info = httpx.get(url + "/v1/model", headers=auth).json()

    # A context with its secret key is refused (422), whatever else is right about it.
    from node.inference.ckks import SecretContext
    from plugins.he import CKKSParameters

    params = CKKSParameters.from_dict(info["ckks"])
    secret = SecretContext.create(params)
    _, galois = secret.public_bundle(info["layout"]["rotations"][:2])
    body = wire.pack({"encoding": info["encoding"]}, [secret.serialize_secret(), galois])
    r = httpx.put(url + "/v1/contexts/with-secret", content=body, headers=auth, timeout=60)
    assert r.status_code == 422 and r.json()["code"] == "secret-key"
    assert httpx.get(url + "/v1/contexts/with-secret", headers=auth).status_code == 404

    # Oversized (413, declared or not), malformed (400) and unknown-key (404) evaluations.
    big = b"\0" * (MAX_BODY_MB * 1024 * 1024 + 1)
    r = httpx.post(url + "/v1/evaluate", content=big, headers=auth, timeout=60)
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY_MB + 1):
            yield b"\0" * (1024 * 1024)

    r = httpx.post(url + "/v1/evaluate", content=chunks(), headers=auth, timeout=60)
    assert r.status_code == 413
    r = httpx.post(url + "/v1/evaluate", content=b"not a message", headers=auth)
    assert r.status_code == 400 and r.json()["code"] == "malformed"
    r = httpx.post(
        url + "/v1/evaluate",
        content=wire.pack({"key_id": "nope", "images": 1}, [b"x"] * info["layout"]["copies"]),
        headers=auth,
    )
    assert r.status_code == 404 and r.json()["code"] == "unknown-context"
    r = httpx.post(
        url + "/v1/evaluate", content=wire.pack({"key_id": "../x", "images": 1}, []), headers=auth
    )
    assert r.status_code == 400

    # A wrong token is a retryable refusal for the node (an administrator may be fixing it).
    with pytest.raises(ServiceUnavailable, match="401"):
        predictor(setup, token="fnt.node-a.wrong").predict(setup.plugin, [np.zeros((1, 64, 64))])

    # ... and the service still serves.
    inputs, _ = synthetic_inputs(setup.plugin, 1, seed=7)
    (result,) = predictor(setup).predict(setup.plugin, [inputs[0]])
    assert abs(result.probability - sigmoid(plaintext_logits(setup, inputs)[0])) <= 1e-3
    assert setup.service.proc.poll() is None


class Recording(httpx.HTTPTransport):
    """The real transport, keeping every request and response body."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, bytes]] = []
        self.responses: list[bytes] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append((request.method, request.url.path, request.content))
        response = super().handle_request(request)
        response.read()
        self.responses.append(response.content)
        return response


def _contains_values(blob: bytes, values: np.ndarray) -> bool:
    """Whether *blob* holds any of *values* as a float64 (either byte order) at any offset.

    (float32 patterns are not checked: 4 random bytes match one of 8,000 values somewhere in
    30 MB of key material dozens of times by chance; 8 bytes do not. The node only ever hands
    float64 to the encoder.)
    """
    wanted = np.unique(values.astype(np.float64))
    wanted = wanted[(wanted != 0.0) & (np.abs(wanted) != 1.0)]  # too common to mean anything
    for dtype in ("<f8", ">f8"):
        for offset in range(8):
            usable = (len(blob) - offset) // 8 * 8
            view = np.frombuffer(blob, dtype=dtype, count=usable // 8, offset=offset)
            if np.isin(view, wanted).any():
                return True
    return False


def test_no_pixel_and_no_decrypted_value_crosses_the_wire(
    setup: Setup, tmp_path: Path
) -> None:
    # A fresh key store: this node registers its context on the wire we record.
    db = Database(f"sqlite:///{tmp_path / 'wire.db'}")
    db.upgrade()
    recording = Recording()
    client = ServiceClient(setup.service.url, setup.token, transport=recording)
    _clients.append(client)
    pred = EncryptedPredictor(client, KeyStore(db, setup.keys.he, timedelta(days=30)))
    inputs, _ = synthetic_inputs(setup.plugin, 2, seed=99)
    results = pred.predict(setup.plugin, list(inputs))
    kinds = [(m, p.split("/")[2]) for m, p, _ in recording.requests]
    assert kinds == [
        ("GET", "model"),
        ("GET", "contexts"),
        ("PUT", "contexts"),
        ("POST", "evaluate"),
    ]
    decrypted = np.array([r.logit for r in results] + [r.probability for r in results])
    for method, path, body in recording.requests:
        if not body:
            continue
        header, parts = wire.unpack(body)
        assert set(header) <= {"key_id", "images", "encoding"}, header
        assert all(isinstance(v, str | int) for v in header.values()), header
        assert not _contains_values(body, inputs), f"pixel values in {method} {path}"
        assert not _contains_values(body, decrypted), f"a decrypted value in {method} {path}"
        if path == "/v1/evaluate":
            from node.inference.ckks import PublicContext

            # every part is a ciphertext of the registered public context, nothing else
            reg = wire.unpack(recording.requests[2][2])[1]
            public = PublicContext(reg[0], reg[1])
            for part in parts:
                from node.inference.ckks import _load, _seal

                ct = _load(_seal().Ciphertext(), public.seal_context, part)
                assert ct.size() == 2
        if path.startswith("/v1/contexts"):
            import tenseal as ts

            assert not ts.context_from(parts[0]).is_private()  # no secret key registered
    # the requests happened before decryption: nothing was sent after the reply came back
    assert len(recording.requests) == 4
    db.dispose()


def test_over_tls_the_node_trusts_the_service_only_through_its_configured_ca(
    setup: Setup, tmp_path: Path
) -> None:
    """``inference-server --tls-cert/--tls-key`` with a test CA: a client given that CA
    (``[inference] ca_file``) gets encrypted predictions that match the plaintext model; one
    that trusts only the system's roots is refused at the handshake with the reason and the
    setting to fix, and the service saw no request of it; plain HTTP to the TLS port fails."""
    ca, cert, key = make_tls(tmp_path / "tls")
    state = tmp_path / "service"
    token = TokenStore(state).issue("node-a")
    with RunningService(setup.artifact, state, verify=str(ca),
                        extra=("--tls-cert", str(cert), "--tls-key", str(key))) as service:
        assert service.url.startswith("https://127.0.0.1:")
        keys = KeyStore(setup.db, setup.keys.he, timedelta(days=30))
        trusted = ServiceClient(service.url, token, verify=str(ca))
        untrusted = ServiceClient(service.url, token)
        _clients.extend((trusted, untrusted))
        inputs, _ = synthetic_inputs(setup.plugin, 2, seed=11)
        with pytest.raises(ServiceUnavailable, match=r"not trusted \(.+\).*ca_file") as refused:
            EncryptedPredictor(untrusted, keys).predict(setup.plugin, [inputs[0]])
        assert "certificate" in str(refused.value)
        assert not list(state.rglob("*.ctx"))  # nothing of that node reached the service
        results = EncryptedPredictor(trusted, keys).predict(setup.plugin, list(inputs))
        assert list(state.rglob("*.ctx"))  # the trusted one registered its public context
        expected = [sigmoid(v) for v in plaintext_logits(setup, inputs)]
        assert max(abs(r.probability - p) for r, p in zip(results, expected, strict=True)) <= 1e-3
        with pytest.raises(httpx.HTTPError):
            httpx.get(service.url.replace("https://", "http://") + "/v1/health", timeout=5)
        for bad in (tmp_path / "missing.pem", key):  # no file; a file that holds no certificate
            with pytest.raises(ServiceUnavailable, match=r"cannot load \[inference\] ca_file"):
                ServiceClient(service.url, token, verify=str(bad))
        assert service.proc.poll() is None
