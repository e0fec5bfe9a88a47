"""The node's side of encrypted inference: talk to the service, encrypt, decrypt, decide.

:class:`ServiceClient` is the HTTP client (httpx) of the protocol in
:mod:`node.inference.service`. :class:`EncryptedPredictor` runs one input through the whole
encrypted path — encode with the service's layout, encrypt under the node's current key
(registering its public context first if the service does not know it), send, decrypt, sigmoid,
decide — and reports timings and bytes. Only ciphertexts and the public context are sent; the
decrypted logit is never sent back (CKKS is not IND-CPA-D secure: decryptions returned to the
evaluator enable key recovery).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from node.inference import wire
from node.inference.errors import ServiceRefused, ServiceUnavailable, WireError
from plugins.he import CKKSParameters, HELayout

if TYPE_CHECKING:
    import ssl

    import httpx

    from node.inference.keystore import KeyStore
    from plugins.base import TaskPlugin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the service publishes about its model."""

    task: str
    task_version: str
    model_id: str
    model_version: str
    params: CKKSParameters
    encoding: str
    layout: HELayout
    kernel: int
    stride: int
    rotations: tuple[int, ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        try:
            params = CKKSParameters.from_dict(data["ckks"])
            lay = data["layout"]
            layout = HELayout(
                slots=params.slots,
                channels=int(lay["channels"]),
                windows=int(lay["windows"]),
                kernel_elems=int(lay["kernel"]) ** 2,
                hidden=int(lay["hidden"]),
            )
            return cls(
                task=str(data["task"]),
                task_version=str(data["task_version"]),
                model_id=str(data["model_id"]),
                model_version=str(data["model_version"]),
                params=params,
                encoding=str(data["encoding"]),
                layout=layout,
                kernel=int(lay["kernel"]),
                stride=int(lay["stride"]),
                rotations=tuple(int(s) for s in lay["rotations"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceRefused(f"the service's model description is malformed: {exc}") from exc


class ServiceClient:
    """HTTP client of one inference service."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 120.0,
        verify: str | bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            verify=trusted_roots(verify) if isinstance(verify, str) else verify,
            transport=transport,
        )
        self._info: tuple[float, ModelInfo] | None = None
        self._registered: set[str] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            untrusted = _untrusted_certificate(exc)
            if untrusted is not None:  # the node's configuration to fix, not the network
                raise ServiceUnavailable(
                    f"inference service {self.url}: its TLS certificate is not trusted "
                    f"({untrusted}); set [inference] ca_file to the CA bundle that signed it"
                ) from exc
            raise ServiceUnavailable(
                f"inference service {self.url} unreachable: {type(exc).__name__}"
            ) from exc
        status = response.status_code
        if status < 400 or status == 404:
            return response
        try:
            message = str(response.json().get("message", ""))
        except ValueError:
            message = response.text[:200]
        if status in (401, 403, 408, 429) or status >= 500:
            # 401: a token being fixed by the administrator; the job retries meanwhile.
            raise ServiceUnavailable(f"inference service answered {status}: {message}")
        raise ServiceRefused(f"inference service refused the request ({status}: {message})")

    def model_info(self, *, max_age: float = 60.0) -> ModelInfo:
        with self._lock:
            if self._info is not None and time.monotonic() - self._info[0] < max_age:
                return self._info[1]
        response = self._request("GET", "/v1/model")
        if response.status_code == 404:
            raise ServiceRefused(f"{self.url} is not a fednode inference service")
        info = ModelInfo.from_json(response.json())
        with self._lock:
            self._info = (time.monotonic(), info)
        return info

    def is_registered(self, key_id: str) -> bool:
        if key_id in self._registered:
            return True
        known = self._request("GET", f"/v1/contexts/{key_id}").status_code == 200
        if known:
            self._registered.add(key_id)
        return known

    def register(self, key_id: str, encoding: str, public: bytes, galois: bytes) -> int:
        """Register a public context; return the bytes sent."""
        body = wire.pack({"encoding": encoding}, [public, galois])
        response = self._request(
            "PUT",
            f"/v1/contexts/{key_id}",
            content=body,
            headers={"Content-Type": wire.CONTENT_TYPE},
        )
        if response.status_code == 404:
            raise ServiceRefused(f"{self.url} does not accept context registrations")
        self._registered.add(key_id)
        logger.info("CKKS context %s registered with %s (%d bytes)", key_id, self.url, len(body))
        return len(body)

    def forget(self, key_id: str) -> None:
        self._registered.discard(key_id)

    def evaluate(
        self, key_id: str, ciphertexts: list[bytes], images: int
    ) -> tuple[dict[str, Any], list[bytes], int, int] | None:
        """``(header, outputs, bytes sent, bytes received)``; ``None`` if the key is unknown."""
        body = wire.pack({"key_id": key_id, "images": images}, ciphertexts)
        response = self._request(
            "POST", "/v1/evaluate", content=body, headers={"Content-Type": wire.CONTENT_TYPE}
        )
        if response.status_code == 404:
            self.forget(key_id)
            return None
        try:
            header, parts = wire.unpack(response.content)
        except WireError as exc:
            raise ServiceUnavailable(f"the service's reply is malformed: {exc}") from exc
        if len(parts) != images or header.get("key_id") != key_id:
            raise ServiceUnavailable("the service's reply does not match the request")
        return header, parts, len(body), len(response.content)


@dataclass(frozen=True)
class Prediction:
    """One encrypted prediction, decrypted on the node."""

    logit: float
    probability: float
    label: str
    model_id: str
    model_version: str
    key_id: str
    timings: dict[str, float]
    """Seconds per step: ``encode``, ``encrypt``, ``service`` (round trip), ``evaluate``
    (the service's own; ``evaluate_cpu`` its CPU time), ``decrypt``, ``register`` (0 unless
    this call registered)."""
    bytes_sent: int
    bytes_received: int
    registration_bytes: int


def trusted_roots(ca_file: str) -> ssl.SSLContext:
    """A TLS context that trusts only the CA bundle *ca_file* (``[inference] ca_file``)."""
    import ssl

    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ServiceUnavailable(f"cannot load [inference] ca_file {ca_file}: {reason}") from exc


def _untrusted_certificate(exc: BaseException) -> str | None:
    """Why the service's certificate failed verification, if that is what *exc* is."""
    import ssl

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen.reason or "verification failed")
        seen = seen.__cause__ or seen.__context__
    return None


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class EncryptedPredictor:
    """Runs task inputs through the encrypted path of one service with the node's keys."""

    def __init__(self, client: ServiceClient, keys: KeyStore) -> None:
        self.client = client
        self.keys = keys

    def predict(self, plugin: TaskPlugin, inputs: list[np.ndarray]) -> list[Prediction]:
        """Predictions of *inputs* (each of ``plugin.input_shape``), one request for all.

        Raises
        ------
        ServiceRefused
            If the service serves another task or task version, or refuses the request.
        ServiceUnavailable
            If the service cannot be reached or fails (retry later).
        """
        info = self.client.model_info()
        if info.task != plugin.name or info.task_version != plugin.version:
            raise ServiceRefused(
                f"the service serves task {info.task} {info.task_version}, "
                f"not {plugin.name} {plugin.version}"
            )
        from plugins.he import HECircuit

        t0 = time.perf_counter()
        lo, hi = plugin.he_encoding.input_range
        vectors: list[np.ndarray] = []
        for x in inputs:
            image = np.clip(np.asarray(x, dtype=np.float64)[0], lo, hi)
            cols = HECircuit.im2col_of(image, info.kernel, info.stride)
            vectors.extend(info.layout.encode_input(cols))
        t1 = time.perf_counter()
        key_id, secret = self.keys.current(plugin.name, info.params)
        cts = secret.encrypt_vectors(vectors)
        t2 = time.perf_counter()
        reg_seconds = 0.0
        reg_bytes = 0
        result = None
        for _attempt in range(2):
            if not self.client.is_registered(key_id):
                r0 = time.perf_counter()
                public, galois = secret.public_bundle(info.rotations)
                reg_bytes += self.client.register(key_id, info.encoding, public, galois)
                reg_seconds += time.perf_counter() - r0
            s0 = time.perf_counter()
            result = self.client.evaluate(key_id, cts, len(inputs))
            service_seconds = time.perf_counter() - s0
            if result is not None:
                break
        if result is None:
            raise ServiceUnavailable("the service forgot the node's context twice in a row")
        header, outputs, sent, received = result
        d0 = time.perf_counter()
        logits = [float(np.mean(secret.decrypt_vector(out))) for out in outputs]
        decrypt_seconds = time.perf_counter() - d0
        n = len(inputs)
        out = []
        for logit in logits:
            p = sigmoid(logit)
            out.append(
                Prediction(
                    logit=logit,
                    probability=p,
                    label=plugin.decide(p).name,
                    model_id=str(header.get("model_id", info.model_id)),
                    model_version=str(header.get("model_version", info.model_version)),
                    key_id=key_id,
                    timings={
                        "encode": (t1 - t0) / n,
                        "encrypt": (t2 - t1) / n,
                        "service": service_seconds / n,
                        "evaluate": float(header.get("seconds", 0.0)) / n,
                        "evaluate_cpu": float(header.get("cpu_seconds", 0.0)) / n,
                        "decrypt": decrypt_seconds / n,
                        "register": reg_seconds,
                    },
                    bytes_sent=sent // n,
                    bytes_received=received // n,
                    registration_bytes=reg_bytes,
                )
            )
        return out
