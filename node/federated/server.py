"""The reference ServerApp of the coordinating site: FedAvg with SecAgg+, client-side clipping
and central DP noise, per-round metrics and privacy accounting, and a final model artifact.

Per round (legacy workflow, because SecAgg+ exists only there in Flower 1.42):

1. every available node (at least ``min-nodes``) is asked to ``fit`` from the current global
   model with the round's ``local-epochs`` and ``learning-rate`` (a cosine schedule over the
   rounds) and the clipping norm;
2. the nodes clip their update (``fixedclipping_mod``) and send it masked under SecAgg+
   (:class:`~flwr.server.workflow.SecAggPlusWorkflow`): the coordinator learns only the sum;
3. :class:`~flwr.server.strategy.DifferentialPrivacyClientSideFixedClipping` adds Gaussian
   noise of standard deviation ``noise-multiplier * clipping-norm / min-nodes`` to the mean and
   :class:`~node.federated.privacy.GaussianAccountant` reports the cumulative ε at ``delta``;
   with noise the mean is unweighted (each node weighs one), which is what bounds one node's
   influence by the clipping norm. Without noise, ``server-momentum`` > 0 applies the mean
   update with server momentum (FedAvgM); it is refused with noise, since its momentum would
   carry the un-noised means of earlier rounds past the accountant;
4. every node evaluates the new model on its own held-out part; the coordinator logs the
   example-weighted loss, AUC, MCC and accuracy.

At the end the global model is written with :func:`node.tasks.training.save_artifact` (the
format ``fednode inference-server`` loads), with the run's rounds, per-round metrics, the
aggregation counts (results and failures per round: a Flower run is "completed" even when
every node failed) and ε. A JSON summary ``federation-summary.json`` is written next to it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from node.federated.env import quiet_flower

quiet_flower()

from flwr.app import Context  # noqa: E402
from flwr.common import (  # noqa: E402
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import (  # noqa: E402
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedAvgM,
    Strategy,
)
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402

from node.federated.params import get_weights, set_weights  # noqa: E402
from node.federated.privacy import GaussianAccountant  # noqa: E402
from plugins.base import TaskPlugin, architecture_hash, resolve_task  # noqa: E402

logger = logging.getLogger(__name__)

SUMMARY_FILE = "federation-summary.json"


@dataclass(frozen=True)
class RunSettings:
    """The run config of the reference ServerApp (``[tool.flwr.app.config]``)."""

    task: str = "chest_xray"
    num_rounds: int = 5
    min_nodes: int = 2
    local_epochs: int = 5
    learning_rate: float = 3e-3
    server_momentum: float = 0.0
    clipping_norm: float = 10.0
    noise_multiplier: float = 0.0
    delta: float = 1e-5
    secagg: bool = True
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_max_weight: float = 1000.0
    secagg_threshold: float = 1.0
    seed: int = 0
    artifact_dir: str = "fednode-artifacts"
    round_timeout: float = 600.0

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        """Parse the run config (keys in kebab case, as in pyproject); unknown keys are refused."""
        known = {f.replace("_", "-"): f for f in cls.__dataclass_fields__}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key not in known:
                raise ValueError(f"unknown run config key {key!r} (known: {sorted(known)})")
            name = known[key]
            default = cls.__dataclass_fields__[name].default
            kwargs[name] = type(default)(value)  # type: ignore[misc]
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        if self.num_rounds < 1 or self.min_nodes < 1 or self.local_epochs < 1:
            raise ValueError("num-rounds, min-nodes and local-epochs must be at least 1")
        if self.clipping_norm <= 0:
            raise ValueError("clipping-norm must be positive")
        if self.noise_multiplier < 0:
            raise ValueError("noise-multiplier must not be negative")
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError("server-momentum must lie in [0, 1)")
        if self.server_momentum > 0 and self.noise_multiplier > 0:
            # FedAvgM keeps its momentum over the un-noised means, so later rounds would
            # release earlier rounds' sums without fresh noise: the accountant would not hold.
            raise ValueError("server-momentum cannot be combined with central DP noise")

    @property
    def uniform(self) -> bool:
        """Whether the mean is unweighted (always with central DP noise)."""
        return self.noise_multiplier > 0

    def round_learning_rate(self, server_round: int) -> float:
        """Cosine schedule over the rounds, from the learning rate down to a tenth of it."""
        progress = (server_round - 1) / max(1, self.num_rounds - 1) if self.num_rounds > 1 else 0
        return self.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass
class RoundRecord:
    """What one round produced (no per-node identity beyond counts)."""

    round: int
    fit_results: int = 0
    fit_failures: int = 0
    evaluate_results: int = 0
    evaluate_failures: int = 0
    train_examples: int = 0
    train_loss: float | None = None
    loss: float | None = None
    auc: float | None = None
    mcc: float | None = None
    accuracy: float | None = None
    epsilon: float | None = None
    seconds: float = 0.0


@dataclass
class RunSummary:
    """The outcome of a run: per-round records, the final weights and where they were saved."""

    settings: RunSettings
    rounds: list[RoundRecord] = field(default_factory=list)
    artifact: Path | None = None
    model_id: str | None = None
    parameters: list[Any] | None = None
    epsilon: float | None = None

    @property
    def completed_rounds(self) -> int:
        """Rounds in which every asked node contributed to the aggregate."""
        return sum(1 for r in self.rounds if r.fit_results > 0 and r.fit_failures == 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "rounds": [asdict(r) for r in self.rounds],
            "completed_rounds": self.completed_rounds,
            "epsilon": self.epsilon,
            "delta": self.settings.delta if self.settings.noise_multiplier > 0 else None,
            "artifact": str(self.artifact) if self.artifact else None,
            "model_id": self.model_id,
        }


def _aggregate_metrics(metrics: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    keys = sorted({k for _, m in metrics for k in m if k != "num_examples"})
    out: dict[str, Scalar] = {}
    for key in keys:
        value = _weighted(metrics, key)
        if value is not None:
            out[key] = value
    return out


def _weighted(metrics: list[tuple[int, dict[str, Scalar]]], key: str) -> float | None:
    pairs = [(n, float(m[key])) for n, m in metrics if key in m]  # type: ignore[arg-type]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


class RecordingStrategy(Strategy):
    """Delegates to *inner* and records each round's counts, metrics and ε.

    Sits outermost, so its ``aggregate_fit`` sees what the SecAgg+ workflow hands the strategy
    (one result per node that completed, each carrying the securely aggregated weights) and the
    failures, before the DP wrapper adds noise.
    """

    def __init__(
        self,
        inner: Strategy,
        settings: RunSettings,
        accountant: GaussianAccountant | None,
        on_round: Callable[[RoundRecord, Parameters | None], None] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.settings = settings
        self.accountant = accountant
        self.on_round = on_round
        self.records: dict[int, RoundRecord] = {}
        self._started: dict[int, float] = {}

    def _record(self, server_round: int) -> RoundRecord:
        return self.records.setdefault(server_round, RoundRecord(round=server_round))

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        self._started[server_round] = time.monotonic()
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rec = self._record(server_round)
        rec.fit_results, rec.fit_failures = len(results), len(failures)
        rec.train_examples = sum(
            int(r.metrics.get("num_examples", r.num_examples)) for _, r in results
        )
        rec.train_loss = _weighted(
            [(int(r.metrics.get("num_examples", r.num_examples)), r.metrics) for _, r in results],
            "train_loss",
        )
        params, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if params is not None and self.accountant is not None:
            rec.epsilon = self.accountant.step()
        if params is None:
            logger.warning(
                "round %d: no update (%d results, %d failures)",
                server_round,
                len(results),
                len(failures),
            )
        if self.on_round is not None:
            self.on_round(rec, params)
        return params, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        rec = self._record(server_round)
        rec.evaluate_results, rec.evaluate_failures = len(results), len(failures)
        pairs = [(r.num_examples, {**r.metrics, "loss": r.loss}) for _, r in results]
        rec.loss = _weighted(pairs, "loss")
        rec.auc = _weighted(pairs, "auc")
        rec.mcc = _weighted(pairs, "mcc")
        rec.accuracy = _weighted(pairs, "accuracy")
        rec.seconds = time.monotonic() - self._started.get(server_round, time.monotonic())
        logger.info(
            "round %d: %d/%d nodes aggregated, held-out loss %s AUC %s MCC %s, epsilon %s",
            server_round,
            rec.fit_results,
            rec.fit_results + rec.fit_failures,
            _fmt(rec.loss),
            _fmt(rec.auc),
            _fmt(rec.mcc),
            _fmt(rec.epsilon),
        )
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return self.inner.evaluate(server_round, parameters)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def build_strategy(
    settings: RunSettings,
    plugin: TaskPlugin,
    *,
    on_round: Callable[[RoundRecord, Parameters | None], None] | None = None,
) -> tuple[RecordingStrategy, list[Any]]:
    """The strategy stack and the initial weights (seeded) of a run."""
    import torch

    torch.manual_seed(settings.seed)
    model = plugin.build_model()
    initial = get_weights(model)

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {
            "server-round": server_round,
            "local-epochs": settings.local_epochs,
            "learning-rate": settings.round_learning_rate(server_round),
            "seed": settings.seed,
            "uniform-weights": settings.uniform,
        }

    common: dict[str, Any] = dict(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=settings.min_nodes,
        min_evaluate_clients=settings.min_nodes,
        min_available_clients=settings.min_nodes,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters(initial),
        accept_failures=False,
        fit_metrics_aggregation_fn=_aggregate_metrics,
        evaluate_metrics_aggregation_fn=_aggregate_metrics,
    )
    fedavg = (  # FedAvgM: the server applies the mean update with momentum
        FedAvgM(**common, server_momentum=settings.server_momentum)
        if settings.server_momentum > 0
        else FedAvg(**common)
    )
    dp = DifferentialPrivacyClientSideFixedClipping(
        fedavg,
        noise_multiplier=settings.noise_multiplier,
        clipping_norm=settings.clipping_norm,
        num_sampled_clients=settings.min_nodes,
    )
    accountant = (
        GaussianAccountant(settings.noise_multiplier, settings.delta)
        if settings.noise_multiplier > 0
        else None
    )
    return RecordingStrategy(dp, settings, accountant, on_round), initial


def run_federation(
    grid: Grid,
    context: Context,
    settings: RunSettings,
    *,
    on_round: Callable[[RoundRecord, Parameters | None], None] | None = None,
    save: bool = True,
) -> RunSummary:
    """Run the rounds on *grid* and save the final model; the body of the ServerApp."""
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

    plugin = resolve_task(settings.task)
    strategy, _ = build_strategy(settings, plugin, on_round=on_round)
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=settings.num_rounds), strategy=strategy
    )
    fit_workflow = (
        SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=settings.secagg_threshold,
            max_weight=1.0 if settings.uniform else settings.secagg_max_weight,
            clipping_range=settings.secagg_clipping_range,
            quantization_range=settings.secagg_quantization_range,
            timeout=settings.round_timeout,
        )
        if settings.secagg
        else None
    )
    workflow = DefaultWorkflow(fit_workflow=fit_workflow)
    logger.info(
        "federation: task %s, %d rounds, at least %d nodes, SecAgg+ %s, clipping %.3g, noise %.3g",
        settings.task,
        settings.num_rounds,
        settings.min_nodes,
        "on" if settings.secagg else "off",
        settings.clipping_norm,
        settings.noise_multiplier,
    )
    workflow(grid, legacy)
    summary = RunSummary(
        settings=settings, rounds=[strategy.records[k] for k in sorted(strategy.records)]
    )
    summary.epsilon = strategy.accountant.epsilon() if strategy.accountant else None
    record = legacy.state.array_records.get(MAIN_PARAMS_RECORD)
    if record is not None:
        import flwr.compat.common.recorddict_compat as compat

        summary.parameters = parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, True))
    if save and summary.parameters is not None:
        _save(summary, plugin)
    return summary


def _save(summary: RunSummary, plugin: TaskPlugin) -> None:
    import torch

    from node import __version__
    from node.tasks.training import save_artifact

    settings = summary.settings
    model = plugin.build_model()
    assert summary.parameters is not None
    set_weights(model, summary.parameters)
    last = summary.rounds[-1] if summary.rounds else RoundRecord(round=0)
    meta = {
        "task": plugin.name,
        "task_version": plugin.version,
        "architecture_hash": architecture_hash(plugin, model),
        "created_at": datetime.now(UTC).isoformat(),
        "source": "federated",
        "fednode_version": __version__,
        "torch_version": torch.__version__,
        "input_shape": list(plugin.input_shape),
        "classes": list(plugin.class_names),
        "threshold": plugin.positive_class.threshold or 0.5,
        "he_encoding": asdict(plugin.he_encoding),
        "n_train": last.train_examples,
        "metrics": {"auc": last.auc, "mcc": last.mcc, "accuracy": last.accuracy, "loss": last.loss},
        "federation": summary.as_dict(),
    }
    directory = Path(settings.artifact_dir).expanduser()
    summary.artifact, summary.model_id = save_artifact(directory, plugin, model, meta)
    (directory / SUMMARY_FILE).write_text(
        json.dumps(summary.as_dict(), indent=2, default=str) + "\n"
    )
    logger.info(
        "federated model %s saved to %s (%d of %d rounds complete)",
        summary.model_id,
        summary.artifact,
        summary.completed_rounds,
        settings.num_rounds,
    )


app = ServerApp()
"""The reference ServerApp (``node.federated.server:app``)."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of a run: parse the run config, run, save."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    run_federation(grid, context, settings)
