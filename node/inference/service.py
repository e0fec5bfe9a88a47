"""The model owner's inference service (``fednode inference-server``): FastAPI + uvicorn.

It loads one model artifact (written by ``fednode train`` or a federated run), turns it into an
HE circuit with per-model CKKS parameters (:mod:`plugins.he`), and serves:

``GET /v1/health``
    liveness (no authentication).
``GET /v1/model``
    task, task version, ``model_id``, model version, CKKS parameters and the layout's
    dimensions (never weights).
``PUT /v1/contexts/{key_id}`` / ``GET /v1/contexts/{key_id}``
    a node registers its public context once per key period: the TenSEAL context (refused with
    422 if it carries a secret key) and the Galois keys of the model's rotations. Kept on disk
    under the state directory, so a restarted service still knows it.
``POST /v1/evaluate``
    ciphertexts of one or more images under a registered key in, one encrypted logit per image
    out. ``404 {"code": "unknown-context"}`` tells the node to register first.

Every ``/v1`` call but health needs ``Authorization: Bearer <token>``: a per-node token the
service's administrator issues with ``fednode inference-server token issue NODE``; only its
SHA-256 is stored (tokens are 256-bit random, so a fast hash is enough). Request bodies are
limited in size (413) and evaluation requests in rate per node (429 with ``Retry-After``);
malformed input gets a 400/422 naming the problem. No ciphertext, key or value is logged.

This module imports FastAPI at the top (handlers' annotations are resolved against its
globals); only the service's own entry points import it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request, Response

from node.errors import NodeError
from node.inference import wire
from node.inference.ckks import CKKSError, Evaluator, PublicContext, SecretKeyRefused
from node.inference.errors import WireError
from plugins.he import CKKSParameters, HECircuit, HELayout, layout_for
from storage.files import atomic_write

if TYPE_CHECKING:
    from fastapi import FastAPI

    from plugins.base import TaskPlugin

logger = logging.getLogger(__name__)

NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN_PREFIX = "fnt"


class ServiceError(NodeError):
    """The inference service cannot start."""


# --------------------------------------------------------------------------------------------
# Tokens


class TokenStore:
    """Per-node tokens, stored hashed in ``<state>/tokens.json`` (mode 0600).

    The file is re-read when it changes, so a token issued or revoked by the CLI takes effect
    without restarting the service.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "tokens.json"
        self._mtime: float | None = None
        self._hashes: dict[str, str] = {}
        self._lock = threading.Lock()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"tokens": {}}
        except (OSError, ValueError) as exc:
            raise ServiceError(f"cannot read the token file {self.path}: {exc}") from exc
        return data if isinstance(data, dict) and "tokens" in data else {"tokens": {}}

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                     mode=0o600)

    def issue(self, node: str) -> str:
        """A new token for *node* (replacing its old one); shown once, stored hashed."""
        if not NODE_NAME_RE.match(node):
            raise ServiceError(
                f"node name {node!r} must be lower-case letters, digits, '-' or '_' (max 63)"
            )
        token = f"{TOKEN_PREFIX}.{node}.{secrets.token_urlsafe(32)}"
        data = self._read()
        data["tokens"][node] = {
            "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self._write(data)
        return token

    def revoke(self, node: str) -> bool:
        data = self._read()
        found = data["tokens"].pop(node, None) is not None
        if found:
            self._write(data)
        return found

    def nodes(self) -> dict[str, str]:
        """Node name -> issue time."""
        return {n: str(v.get("issued_at", "")) for n, v in self._read()["tokens"].items()}

    def authenticate(self, token: str) -> str | None:
        """The node *token* belongs to, or ``None``."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None
        node = parts[1]
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._hashes = {
                    n: str(v.get("sha256", "")) for n, v in self._read()["tokens"].items()
                }
                self._mtime = mtime
            expected = self._hashes.get(node)
        if expected is None:
            return None
        given = hashlib.sha256(token.encode()).hexdigest()
        return node if hmac.compare_digest(given, expected) else None


# --------------------------------------------------------------------------------------------
# The served model


@dataclass(frozen=True)
class ServedModel:
    """A loaded artifact, as the service evaluates it."""

    plugin: TaskPlugin
    circuit: HECircuit
    params: CKKSParameters
    model_id: str
    model_version: str

    @property
    def layout(self) -> HELayout:
        return layout_for(self.circuit, self.params)

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` publishes (dimensions, never weights)."""
        lay = self.layout
        return {
            "task": self.plugin.name,
            "task_version": self.plugin.version,
            "model_id": self.model_id,
            "model_version": self.model_version,
            "ckks": self.params.as_dict(),
            "encoding": self.params.digest(),
            "layout": {
                "input_shape": list(self.circuit.input_shape),
                "kernel": self.circuit.kernel,
                "stride": self.circuit.stride,
                "channels": lay.channels,
                "windows": lay.windows,
                "hidden": lay.hidden,
                "copies": lay.copies,
                "rotations": lay.rotation_steps(),
            },
            "input_range": list(self.plugin.he_encoding.input_range),
        }


def load_served_model(artifact: Path, task_ref: str | None = None) -> ServedModel:
    """Load *artifact* (its task from the artifact, or *task_ref*) and plan its circuit.

    Raises
    ------
    ServiceError
        If the artifact cannot be read, its task is unknown or its model cannot run under CKKS.
    """
    from node.tasks.training import load_artifact
    from plugins.base import TaskPluginError, check_plugin, resolve_task
    from plugins.he import choose_parameters, he_circuit

    try:
        meta = json.loads(artifact.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        raise ServiceError(f"cannot read the artifact's metadata next to {artifact}") from exc
    ref = task_ref or str(meta.get("task", ""))
    try:
        plugin = resolve_task(ref)
        model, meta = load_artifact(artifact, plugin)
        check_plugin(plugin, model=model)
        circuit = he_circuit(plugin, model)
    except (TaskPluginError, NodeError) as exc:
        raise ServiceError(f"model {artifact.name} cannot be served: {exc}") from exc
    params = choose_parameters(circuit, plugin.he_encoding.input_range)
    version = str(meta.get("model_version") or meta.get("created_at") or "unknown")
    return ServedModel(plugin, circuit, params, str(meta["model_id"]), version)


# --------------------------------------------------------------------------------------------
# Limits and registered contexts


@dataclass(frozen=True)
class Limits:
    max_evaluate_bytes: int = 64 * 1024 * 1024
    """Largest evaluation request (16 images of the reference task are ~26 MB)."""
    max_context_bytes: int = 128 * 1024 * 1024
    """Largest context registration (the reference task's is ~29 MB)."""
    max_images: int = 16
    rate_per_minute: float = 600.0
    """Evaluation requests per node and minute (token bucket)."""
    burst: int = 60


MAX_CONTEXTS_PER_NODE = 4
"""Public contexts kept on disk per node: registrations beyond it remove the oldest (a node
registers once per key period, so this spans several rotations)."""
MAX_CACHED_EVALUATORS = 16
"""Evaluators (deserialised public contexts with their Galois keys) kept in memory."""


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class ServiceState:
    model: ServedModel
    state_dir: Path
    limits: Limits
    tokens: TokenStore
    evaluators: OrderedDict[tuple[str, str], Evaluator] = field(default_factory=OrderedDict)
    """Evaluators of registered contexts, least recently used first (at most
    :data:`MAX_CACHED_EVALUATORS`: each holds a context's Galois keys in memory)."""
    buckets: dict[str, _Bucket] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cache(self, node: str, key_id: str, ev: Evaluator) -> None:
        """Remember *ev*, evicting the least recently used evaluator beyond the cap."""
        with self.lock:
            self.evaluators[(node, key_id)] = ev
            self.evaluators.move_to_end((node, key_id))
            while len(self.evaluators) > MAX_CACHED_EVALUATORS:
                self.evaluators.popitem(last=False)

    def prune_contexts(self, node: str) -> int:
        """Keep the :data:`MAX_CONTEXTS_PER_NODE` newest contexts of *node* on disk (the
        current key and those of results still in flight across a rotation); return how
        many older ones were removed."""
        ctx_path, _ = self.context_paths(node, "x")
        try:
            contexts = sorted(ctx_path.parent.glob("*.ctx"), key=lambda p: p.stat().st_mtime)
        except FileNotFoundError:
            return 0
        removed = 0
        for old in contexts[:-MAX_CONTEXTS_PER_NODE]:
            old.unlink(missing_ok=True)
            old.with_suffix(".galois").unlink(missing_ok=True)
            with self.lock:
                self.evaluators.pop((node, old.stem), None)
            removed += 1
        return removed

    def context_paths(self, node: str, key_id: str) -> tuple[Path, Path]:
        base = self.state_dir / "contexts" / node / self.model.params.digest()
        return base / f"{key_id}.ctx", base / f"{key_id}.galois"

    def evaluator(self, node: str, key_id: str) -> Evaluator | None:
        with self.lock:
            ev = self.evaluators.get((node, key_id))
            if ev is not None:
                self.evaluators.move_to_end((node, key_id))
        if ev is not None:
            return ev
        ctx_path, gal_path = self.context_paths(node, key_id)
        try:
            public, galois = ctx_path.read_bytes(), gal_path.read_bytes()
        except FileNotFoundError:
            return None
        ev = Evaluator(self.model.circuit, self.model.params, PublicContext(public, galois))
        self.cache(node, key_id, ev)
        return ev

    def allow(self, node: str) -> float:
        """0 if *node* may evaluate now, else the seconds to wait."""
        rate = self.limits.rate_per_minute / 60.0
        now = time.monotonic()
        with self.lock:
            b = self.buckets.get(node) or _Bucket(float(self.limits.burst), now)
            b.tokens = min(float(self.limits.burst), b.tokens + (now - b.at) * rate)
            b.at = now
            self.buckets[node] = b
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return 0.0
            return (1.0 - b.tokens) / rate


def create_app(model: ServedModel, state_dir: Path, limits: Limits | None = None) -> FastAPI:
    """The service's FastAPI application."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    state = ServiceState(model, state_dir, limits or Limits(), TokenStore(state_dir))
    app = FastAPI(title="fednode inference service", docs_url=None, redoc_url=None)
    app.state.fednode = state

    def problem(status: int, code: str, message: str, **headers: str) -> HTTPException:
        return HTTPException(status, detail={"code": code, "message": message}, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        return JSONResponse(detail, status_code=exc.status_code, headers=exc.headers)

    def authenticate(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise problem(401, "unauthenticated", "missing bearer token",
                          **{"WWW-Authenticate": "Bearer"})
        node = state.tokens.authenticate(token.strip())
        if node is None:
            logger.warning("request with an unknown or revoked token refused")
            raise problem(401, "unauthenticated", "unknown or revoked token",
                          **{"WWW-Authenticate": "Bearer"})
        return node

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise problem(400, "bad-request", "bad Content-Length") from None
            if size > limit:
                raise problem(413, "too-large", f"body over the {limit}-byte limit")
        chunks = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise problem(413, "too-large", f"body over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(body: bytes, max_parts: int) -> tuple[dict[str, Any], list[bytes]]:
        try:
            return wire.unpack(body, max_parts=max_parts)
        except WireError as exc:
            raise problem(400, "malformed", str(exc)) from exc

    def check_key_id(key_id: str) -> None:
        if not KEY_ID_RE.match(key_id):
            raise problem(400, "bad-key-id", "key ids are 1-64 letters, digits, '.', '_', '-'")

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    def describe(request: Request) -> dict[str, Any]:
        authenticate(request)
        return model.describe()

    @app.get("/v1/contexts/{key_id}")
    def context_known(key_id: str, request: Request) -> dict[str, Any]:
        node = authenticate(request)
        check_key_id(key_id)
        ctx_path, _ = state.context_paths(node, key_id)
        if not ctx_path.exists():
            raise problem(404, "unknown-context", f"no context {key_id} registered")
        return {"key_id": key_id, "registered": True}

    @app.put("/v1/contexts/{key_id}", status_code=201)
    async def register(key_id: str, request: Request) -> dict[str, Any]:
        node = authenticate(request)
        check_key_id(key_id)
        # A registration costs the service far more than an evaluation (disk, memory, the
        # Galois keys' deserialisation): it takes a token of the same per-node bucket.
        wait = state.allow(node)
        if wait > 0:
            raise problem(429, "rate-limited", "too many requests",
                          **{"Retry-After": str(max(1, round(wait)))})
        body = await read_body(request, state.limits.max_context_bytes)
        header, parts = parse(body, 2)
        if len(parts) != 2:
            raise problem(400, "malformed", "a registration is a context and its Galois keys")
        if header.get("encoding") != model.params.digest():
            raise problem(409, "wrong-encoding",
                          "the context is not for this model's CKKS parameters")

        def build() -> Evaluator:
            return Evaluator(model.circuit, model.params, PublicContext(parts[0], parts[1]))

        try:
            ev = await run_in_threadpool(build)
        except SecretKeyRefused as exc:
            logger.warning("node %s sent a context with a secret key; refused", node)
            raise problem(422, "secret-key", str(exc)) from exc
        except CKKSError as exc:
            raise problem(422, "bad-context", str(exc)) from exc
        ctx_path, gal_path = state.context_paths(node, key_id)
        ctx_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(gal_path, parts[1])
        atomic_write(ctx_path, parts[0])
        state.cache(node, key_id, ev)
        state.prune_contexts(node)
        logger.info("node %s registered context %s (%d bytes)", node, key_id, len(body))
        return {"key_id": key_id, "registered": True}

    @app.post("/v1/evaluate")
    async def evaluate(request: Request) -> Response:
        node = authenticate(request)
        wait = state.allow(node)
        if wait > 0:
            raise problem(429, "rate-limited", "too many requests",
                          **{"Retry-After": str(max(1, round(wait)))})
        body = await read_body(request, state.limits.max_evaluate_bytes)
        copies = model.layout.copies
        header, parts = parse(body, state.limits.max_images * copies)
        key_id = str(header.get("key_id", ""))
        check_key_id(key_id)
        images = header.get("images")
        if not isinstance(images, int) or images < 1 or len(parts) != images * copies:
            raise problem(400, "malformed", f"each image is {copies} ciphertexts")
        ev = await run_in_threadpool(state.evaluator, node, key_id)
        if ev is None:
            raise problem(404, "unknown-context", f"no context {key_id} registered")
        started = time.perf_counter()
        cpu = time.process_time()

        def run() -> list[bytes]:
            return [ev.evaluate(parts[i * copies : (i + 1) * copies]) for i in range(images)]

        try:
            outputs = await run_in_threadpool(run)
        except CKKSError as exc:
            raise problem(422, "bad-ciphertext", str(exc)) from exc
        seconds = time.perf_counter() - started
        logger.info(
            "node %s: %d image(s) evaluated under %s in %.3f s (%d bytes in)",
            node, images, key_id, seconds, len(body),
        )
        reply = wire.pack(
            {
                "key_id": key_id,
                "model_id": model.model_id,
                "model_version": model.model_version,
                "images": images,
                "seconds": round(seconds, 6),
                "cpu_seconds": round(time.process_time() - cpu, 6),
            },
            outputs,
        )
        return Response(reply, media_type=wire.CONTENT_TYPE)

    return app


def serve(
    model: ServedModel,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8443,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    limits: Limits | None = None,
    announce: Any = None,
) -> None:
    """Run the service until SIGINT/SIGTERM; *announce(url)* is called once it listens."""
    import socket

    import uvicorn

    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    app = create_app(model, state_dir, limits)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    actual = sock.getsockname()[1]
    scheme = "https" if tls_cert else "http"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    if announce is not None:
        announce(f"{scheme}://{host}:{actual}")
    server.run(sockets=[sock])
