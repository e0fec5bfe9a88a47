"""The ``infer`` job: a complete study's task input, encrypted, evaluated by the model owner.

``prepare_task_input`` (the study's accepted instances, preprocessed) → encrypt under the
node's current CKKS key for the task → the inference service evaluates → decrypt → sigmoid →
``decide`` → one :class:`storage.models.Result` row (the report stage's sweep queues its
``report`` job). A superseded study version completes without work. The handler is idempotent:
an existing result for the same study version ends the job; two workers racing on one study
version leave one row (the unique constraint).

Service down, slow, rate-limiting or restarting: :class:`ServiceUnavailable` is an ordinary
error, so the job is retried with backoff in its lane and nothing is lost. A refusal that a
retry cannot change (another task served, a malformed request) dead-letters the job.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from node.inference.errors import ServiceRefused, ServiceUnavailable
from node.jobs import (
    InferPayload,
    JobContext,
    JobKind,
    PermanentJobError,
    register,
)
from node.logs import short_key
from node.tasks.studies import prepare_task_input
from storage.models import Result
from storage.records import Job

if TYPE_CHECKING:
    from node.config import Settings
    from node.inference.client import EncryptedPredictor

logger = logging.getLogger(__name__)

_predictors: dict[tuple[str, str], EncryptedPredictor] = {}
_lock = threading.Lock()


def read_token(settings: Settings) -> str:
    """This node's token for the inference service (``[inference] token_file``)."""
    path = settings.inference.token_file
    if path is None:
        raise ServiceUnavailable("[inference] token_file is not set; results wait")
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ServiceUnavailable(
            f"cannot read [inference] token_file {path}: {exc.strerror}"
        ) from exc
    if not token:
        raise ServiceUnavailable(f"[inference] token_file {path} is empty")
    return token


def predictor_for(ctx: JobContext) -> EncryptedPredictor:
    """The process's predictor for the configured service (made once per server and token)."""
    from node.inference.client import EncryptedPredictor, ServiceClient
    from node.inference.keystore import KeyStore

    settings = ctx.settings
    server = settings.inference.server
    if not server:
        raise ServiceUnavailable("[inference] server is not set; results wait")
    token = read_token(settings)
    key = (server, token)
    with _lock:
        found = _predictors.get(key)
        if found is None:
            ca = settings.inference.ca_file
            client = ServiceClient(
                server,
                token,
                timeout=settings.inference.timeout_seconds,
                verify=str(ca) if ca else True,
            )
            keys = KeyStore(
                ctx.db, ctx.keys.he, timedelta(days=settings.inference.key_rotation_days)
            )
            found = _predictors[key] = EncryptedPredictor(client, keys)
    return found


def _existing(ctx: JobContext, payload: InferPayload) -> int | None:
    with ctx.db.session() as session:
        found: int | None = session.execute(
            select(Result.id).where(
                Result.study_key == payload.study_key,
                Result.task == payload.task,
                Result.study_version == payload.study_version,
            )
        ).scalar_one_or_none()
        return found


@register(JobKind.INFER)
def handle_infer(job: Job, payload: InferPayload, ctx: JobContext) -> None:
    """Run one ``infer`` job (see the module docstring)."""
    if _existing(ctx, payload) is not None:
        logger.info("study %s: %s result exists; nothing to do", short_key(payload.study_key),
                    payload.task)
        return
    task_input = prepare_task_input(ctx, payload)
    if task_input is None:
        return
    from node.tasks import get_task

    plugin = get_task(ctx.settings, payload.task)
    try:
        (pred,) = predictor_for(ctx).predict(plugin, [task_input.array])
    except ServiceRefused as exc:
        raise PermanentJobError(str(exc)) from exc
    timings = {k: round(v, 6) for k, v in pred.timings.items()}
    try:
        with ctx.db.session() as session:
            row = Result(
                study_key=payload.study_key,
                task=payload.task,
                study_version=payload.study_version,
                label=pred.label,
                probability=pred.probability,
                model_id=pred.model_id,
                model_version=pred.model_version,
                key_id=pred.key_id,
                timings=timings,
                bytes_sent=pred.bytes_sent,
                bytes_received=pred.bytes_received,
            )
            session.add(row)
    except IntegrityError:
        logger.info("study %s: %s result written by another worker", short_key(payload.study_key),
                    payload.task)
        return
    logger.info(
        "study %s: %s result stored (model %s, key %s, %.2f s in the service)",
        short_key(payload.study_key),
        payload.task,
        pred.model_id,
        pred.key_id,
        pred.timings["service"],
    )
