"""The node's Flower ClientApp: trains and evaluates the configured task on the node's own
de-identified, labelled studies.

How one run goes, on the node:

- The SuperNode is started with ``--node-config 'fednode-config="/etc/fednode/fednode.toml"'``
  (``fednode federation join`` does that); :func:`client_fn` opens the node's storage from that
  file, reads the labelled studies of the run's task (``task`` in the run config) from the blob
  store and splits them as local training does (stratified, seeded held-out part).
- ``fit``: one federated round is one call of :func:`node.tasks.training.fit_round` over the
  round's ``local-epochs`` with the round's ``learning-rate`` (the coordinator's schedule).
- ``evaluate``: loss, AUC, MCC, accuracy on the node's held-out part.

What leaves the node is the model weights (clipped, optionally noised, masked by SecAgg+), the
number of examples and aggregate metrics. No study key, pseudonym, label list or per-study
value is in any message; error replies carry only the exception type (:mod:`.executor`).

Mods, legacy path. Secure aggregation (SecAgg+) exists in Flower 1.42 only on the legacy
``NumPyClient`` path (``secaggplus_mod``); the Message API has the DP mods but no SecAgg+. The
ClientApp is therefore a legacy ``ClientApp(client_fn, mods=[...])`` with the mods, outermost
first: ``secaggplus_mod`` (masks what it receives), :func:`node_local_dp_mod` (optional local
DP noise on the clipped update, decided by the node's own config) and ``fixedclipping_mod``
(clips the update to the coordinator's norm; it refuses a round whose config has no clipping
norm, so the node never sends an unclipped update). Without local DP this is exactly
``[secaggplus_mod, fixedclipping_mod]``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.federated.env import quiet_flower

quiet_flower()

import numpy as np  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.client import Client, ClientApp, NumPyClient  # noqa: E402
from flwr.client.mod import fixedclipping_mod, secaggplus_mod  # noqa: E402
from flwr.clientapp.typing import ClientAppCallable, Mod  # noqa: E402

from node.config import load_settings  # noqa: E402
from node.federated.params import get_weights, set_weights  # noqa: E402
from node.tasks import get_task  # noqa: E402
from node.tasks.training import (  # noqa: E402
    LabelledData,
    TrainOptions,
    evaluate,
    fit_round,
    load_labelled,
)
from plugins.base import TaskPlugin  # noqa: E402

logger = logging.getLogger(__name__)

NODE_CONFIG_KEY = "fednode-config"
"""The SuperNode ``--node-config`` key naming the node's fednode.toml."""
UNIFORM_KEY = "uniform-weights"
CLIPPING_NORM_KEY = "clipping_norm"  # the key Flower's DP wrapper sends


@dataclass(frozen=True)
class RoundConfig:
    """What the coordinator asks of one round (``FitIns.config``)."""

    server_round: int
    local_epochs: int
    learning_rate: float
    seed: int
    uniform: bool

    @classmethod
    def parse(cls, config: dict[str, Any], defaults: TrainOptions) -> RoundConfig:
        rnd = int(config.get("server-round", 1))
        epochs = int(config.get("local-epochs", 1))
        lr = float(config.get("learning-rate", defaults.learning_rate))
        if not 1 <= epochs <= 1000 or not 0.0 < lr < 1.0 or math.isnan(lr):
            raise ValueError("the round config asks for out-of-range local epochs or learning rate")
        return cls(
            server_round=rnd,
            local_epochs=epochs,
            learning_rate=lr,
            seed=int(config.get("seed", defaults.seed)) * 1000 + rnd,
            uniform=bool(config.get(UNIFORM_KEY, False)),
        )


class NodeClient(NumPyClient):
    """Trains and evaluates *plugin*'s model on the node's preprocessed labelled data."""

    def __init__(
        self, plugin: TaskPlugin, data: LabelledData, options: TrainOptions | None = None
    ) -> None:
        self.plugin = plugin
        self.data = data
        self.options = options or TrainOptions()
        self.model = plugin.build_model()

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_weights(self.model)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        rc = RoundConfig.parse(config, self.options)
        set_weights(self.model, parameters)
        inputs, targets = self.data.train
        loss = fit_round(
            self.plugin,
            self.model,
            inputs,
            targets,
            self.options,
            epochs=rc.local_epochs,
            learning_rate=rc.learning_rate,
            seed=rc.seed,
            anneal=False,
        )
        n = len(targets)
        metrics = {"train_loss": float(loss), "num_examples": n}
        logger.info("round %d: trained on %d studies, loss %.4f", rc.server_round, n, loss)
        # With uniform weighting (central DP) every node weighs 1 in the mean, so one node's
        # contribution is bounded by the clipping norm whatever its size.
        return get_weights(self.model), 1 if rc.uniform else n, metrics

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        set_weights(self.model, parameters)
        inputs, targets = self.data.held
        loss, m = evaluate(self.plugin, self.model, inputs, targets)
        metrics = {
            "auc": _finite(m.auc),
            "mcc": _finite(m.mcc),
            "accuracy": _finite(m.accuracy),
            "num_examples": len(targets),
        }
        return float(loss), len(targets), metrics


def _finite(value: float) -> float:
    return 0.0 if value is None or math.isnan(value) else float(value)


_data_cache: dict[tuple[str, str, float, int], tuple[TaskPlugin, LabelledData]] = {}
_cache_lock = threading.Lock()


def node_data(
    config_path: Path, task: str, options: TrainOptions
) -> tuple[TaskPlugin, LabelledData]:
    """The task plugin and the node's labelled data, read once per process."""
    from node.runtime import open_context

    key = (str(config_path), task, options.holdout, options.seed)
    with _cache_lock:
        if key in _data_cache:
            return _data_cache[key]
        settings = load_settings(config_path)
        plugin = get_task(settings, task)
        ctx = open_context(settings)
        data = load_labelled(ctx.db, ctx.blobs, plugin, holdout=options.holdout, seed=options.seed)
        _data_cache[key] = (plugin, data)
        return plugin, data


def _options(run_config: dict[str, Any]) -> TrainOptions:
    base = TrainOptions()
    return TrainOptions(
        batch_size=int(run_config.get("batch-size", base.batch_size)),
        learning_rate=float(run_config.get("learning-rate", base.learning_rate)),
        holdout=float(run_config.get("holdout", base.holdout)),
        seed=int(run_config.get("seed", base.seed)),
    )


def client_fn(context: Context) -> Client:
    """Build the node's client from the SuperNode's node config and the run config."""
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ValueError(f"the SuperNode was started without --node-config {NODE_CONFIG_KEY}=...")
    task = str(context.run_config.get("task", "chest_xray"))
    options = _options(dict(context.run_config))
    plugin, data = node_data(Path(path), task, options)
    return NodeClient(plugin, data, options).to_client()


def fixed_client_fn(
    plugin: TaskPlugin, data: LabelledData, options: TrainOptions | None = None
) -> Callable[[Context], Client]:
    """A ``client_fn`` over data already loaded (the in-process grid of tests and benchmarks)."""

    def client_fn(context: Context) -> Client:
        return NodeClient(plugin, data, options).to_client()

    return client_fn


def node_local_dp_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Local DP when the node's config asks for it: Gaussian noise on the clipped update.

    Runs inside ``fixedclipping_mod``'s output (the update is already clipped to the
    coordinator's norm ``C``) and adds ``N(0, (s C)^2)`` per coordinate with the node's
    ``[federation] local_dp_noise_multiplier`` s, so the node's update is differentially
    private on its own, before SecAgg+ and whatever the coordinator does. s = 0 (the default)
    leaves the message unchanged.
    """
    from flwr.app.message_type import MessageType

    sigma = _local_sigma(ctxt)
    if msg.metadata.message_type != MessageType.TRAIN or sigma <= 0:
        return call_next(msg, ctxt)
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    norm = float(fit_ins.config.get(CLIPPING_NORM_KEY, 0.0))
    if norm <= 0:
        raise ValueError("local DP needs the coordinator's clipping norm")
    before = parameters_to_ndarrays(fit_ins.parameters)
    out = call_next(msg, ctxt)
    if out.has_error():
        return out
    fit_res = compat.recorddict_to_fitres(out.content, keep_input=True)
    after = parameters_to_ndarrays(fit_res.parameters)
    rng = np.random.default_rng()
    noised = [
        (a + rng.normal(0.0, sigma * norm, a.shape)).astype(a.dtype)
        for a, b in zip(after, before, strict=True)
    ]
    fit_res.parameters = ndarrays_to_parameters(noised)
    out.content = compat.fitres_to_recorddict(fit_res, keep_input=True)
    return out


def _local_sigma(ctxt: Context) -> float:
    path = ctxt.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        return 0.0
    return float(load_settings(Path(path)).federation.local_dp_noise_multiplier)


MODS: list[Mod] = [secaggplus_mod, node_local_dp_mod, fixedclipping_mod]

app = ClientApp(client_fn=client_fn, mods=MODS)
"""The node's ClientApp (``node.federated.client:app``)."""
