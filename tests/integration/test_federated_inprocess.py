"""Federated training in one process: three synthetic sites, the real ServerApp workflow
(FedAvg + SecAgg+ + client-side clipping, central DP wrapper) against real ClientApps with the
node's mods, over :class:`node.federated.inprocess.InProcessGrid` (Flower's simulation engine
needs Ray, which the node does not install).

- the securely aggregated model equals the plain example-weighted mean of the clipped updates
  the nodes handed to SecAgg+, within SecAgg+'s quantisation tolerance; every update was
  clipped to the coordinator's norm; nothing in any reply names a study;
- the federated model beats each site's local-only model on a held-out set none of them has;
- with central DP noise the accountant's epsilon grows round by round.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from node.federated.env import quiet_flower

quiet_flower()

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.client import ClientApp  # noqa: E402
from flwr.client.mod import fixedclipping_mod, secaggplus_mod  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402

from node.federated import client as fed_client  # noqa: E402
from node.federated.client import fixed_client_fn  # noqa: E402
from node.federated.inprocess import InProcessGrid  # noqa: E402
from node.federated.params import set_weights, update_norm  # noqa: E402
from node.federated.server import RunSettings, run_federation  # noqa: E402
from node.tasks.training import (  # noqa: E402
    LabelledData,
    TrainOptions,
    evaluate,
    fit_round,
    load_labelled,
)
from plugins.base import TaskPlugin, resolve_task  # noqa: E402
from tests.support.federation import make_site, shared_holdout  # noqa: E402

pytestmark = pytest.mark.slow

STUDIES_PER_SITE = 60
ALLOWED_METRICS = {"train_loss", "num_examples", "auc", "mcc", "accuracy", "loss"}


@pytest.fixture(scope="module")
def sites(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[TaskPlugin, list[LabelledData], list[list[str]]]:
    plugin = resolve_task("chest_xray")
    root = tmp_path_factory.mktemp("sites")
    datas, keys = [], []
    for i in range(3):
        ctx, site_keys = make_site(root / f"site{i}", plugin, i, STUDIES_PER_SITE)
        datas.append(load_labelled(ctx.db, ctx.blobs, plugin, holdout=0.25, seed=0))
        keys.append(site_keys)
    return plugin, datas, keys


@pytest.fixture(scope="module")
def holdout() -> tuple[torch.Tensor, torch.Tensor]:
    return shared_holdout(resolve_task("chest_xray"), 200)


def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def test_the_node_clientapp_has_the_secagg_and_clipping_mods_in_order() -> None:
    mods = fed_client.MODS
    assert mods[0] is secaggplus_mod and mods[-1] is fixedclipping_mod
    assert fed_client.app is not None


def test_secure_aggregate_is_the_mean_of_the_clipped_updates(sites) -> None:  # type: ignore[no-untyped-def]
    plugin, datas, keys = sites
    sent: dict[int, dict[int, tuple[list[np.ndarray], int]]] = {}
    received: dict[int, list[np.ndarray]] = {}
    globals_: dict[int, list[np.ndarray]] = {}

    def recorder(nid: int):  # type: ignore[no-untyped-def]
        def mod(msg: Message, ctxt: Context, call_next):  # type: ignore[no-untyped-def]
            if "fitins.parameters" in msg.content.array_records:  # the training stage
                ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
                globals_[int(msg.metadata.group_id)] = parameters_to_ndarrays(ins.parameters)
            out = call_next(msg, ctxt)
            if out.has_content() and "fitres.parameters" in out.content.array_records:
                res = compat.recorddict_to_fitres(out.content, keep_input=True)
                rnd = int(msg.metadata.group_id)
                sent.setdefault(rnd, {})[nid] = (
                    parameters_to_ndarrays(res.parameters),
                    res.num_examples,
                )
            return out

        return mod

    replies: list[Message] = []
    nodes = {
        10 + i: (
            ClientApp(
                client_fn=fixed_client_fn(plugin, d),
                mods=[secaggplus_mod, recorder(10 + i), fixedclipping_mod],
            ),
            {},
        )
        for i, d in enumerate(datas)
    }
    grid = InProcessGrid(nodes, observe=lambda nid, m: replies.append(m))
    settings = RunSettings(
        num_rounds=3, min_nodes=3, local_epochs=2, learning_rate=5e-3, clipping_norm=0.5
    )

    def on_round(rec, params) -> None:  # type: ignore[no-untyped-def]
        received[rec.round] = parameters_to_ndarrays(params)

    summary = run_federation(grid, _context(), settings, on_round=on_round, save=False)
    assert summary.completed_rounds == 3
    assert [r.fit_results for r in summary.rounds] == [3, 3, 3]
    step = 2 * settings.secagg_clipping_range / settings.secagg_quantization_range
    for rnd in (1, 2, 3):
        updates = sent[rnd]
        assert len(updates) == 3
        for params, _ in updates.values():  # clipped to the coordinator's norm
            assert update_norm(params, globals_[rnd]) <= settings.clipping_norm * (1 + 1e-5)
        weights = np.array([n for _, n in updates.values()], dtype=np.float64)
        ratios = weights / settings.secagg_max_weight
        tol = 2 * len(updates) * step / ratios.sum()
        for k, agg in enumerate(received[rnd]):
            plain = (
                sum(w * p[k] for (p, _), w in zip(updates.values(), weights, strict=True))
                / weights.sum()
            )
            assert np.max(np.abs(agg - plain)) <= tol
        # and it is a mean, not one site's model passed through
        for params, _ in updates.values():
            assert (
                max(np.max(np.abs(a - p)) for a, p in zip(received[rnd], params, strict=True))
                > 10 * tol
            )
    # nothing in any reply names a study or carries per-study values
    every_key = {k for site in keys for k in site}
    for reply in replies:
        content = reply.content
        for record in content.metric_records.values():
            assert set(record) <= ALLOWED_METRICS
        text = repr({k: dict(v) for k, v in content.config_records.items()})
        text += repr({k: dict(v) for k, v in content.metric_records.items()})
        assert not any(key in text for key in every_key)
        assert all(
            "2.25." not in str(v) for r in content.config_records.values() for v in r.values()
        )


def _local_only(plugin: TaskPlugin, data: LabelledData, epochs: int, lr: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = plugin.build_model()
    x, y = data.train
    fit_round(plugin, model, x, y, TrainOptions(), epochs=epochs, learning_rate=lr, seed=0)
    return model


def test_federated_model_beats_every_local_only_model(sites, holdout) -> None:  # type: ignore[no-untyped-def]
    plugin, datas, _ = sites
    hx, hy = holdout
    nodes = {
        10 + i: (ClientApp(client_fn=fixed_client_fn(plugin, d), mods=fed_client.MODS[::2]), {})
        for i, d in enumerate(datas)
    }
    settings = RunSettings(num_rounds=25, min_nodes=3, local_epochs=4, learning_rate=5e-3)
    summary = run_federation(InProcessGrid(nodes), _context(), settings, save=False)
    assert summary.completed_rounds == settings.num_rounds
    model = plugin.build_model()
    set_weights(model, summary.parameters)  # type: ignore[arg-type]
    fed_auc = evaluate(plugin, model, hx, hy)[1].auc
    local = [evaluate(plugin, _local_only(plugin, d, 100, 5e-3), hx, hy)[1].auc for d in datas]
    print(f"federated AUC {fed_auc:.3f}; local-only {[round(a, 3) for a in local]}")
    assert all(fed_auc > a for a in local)
    assert fed_auc > 0.8


def test_central_dp_reports_a_growing_epsilon(sites) -> None:  # type: ignore[no-untyped-def]
    plugin, datas, _ = sites
    nodes = {
        10 + i: (ClientApp(client_fn=fixed_client_fn(plugin, d), mods=fed_client.MODS[::2]), {})
        for i, d in enumerate(datas)
    }
    settings = RunSettings(
        num_rounds=3, min_nodes=3, local_epochs=1, noise_multiplier=1.0, clipping_norm=1.0
    )
    summary = run_federation(InProcessGrid(nodes), _context(), settings, save=False)
    eps = [r.epsilon for r in summary.rounds]
    assert all(e is not None and math.isfinite(e) for e in eps)
    assert eps[0] < eps[1] < eps[2] == summary.epsilon  # type: ignore[operator]


def test_the_artifact_is_in_the_local_training_format(sites, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from node.tasks.training import load_artifact

    plugin, datas, _ = sites
    nodes = {
        10 + i: (ClientApp(client_fn=fixed_client_fn(plugin, d), mods=fed_client.MODS[::2]), {})
        for i, d in enumerate(datas)
    }
    settings = RunSettings(num_rounds=1, min_nodes=3, local_epochs=1, artifact_dir=str(tmp_path))
    summary = run_federation(InProcessGrid(nodes), _context(), settings)
    assert summary.artifact is not None and summary.artifact.parent == tmp_path
    _model, meta = load_artifact(summary.artifact, plugin)
    assert meta["source"] == "federated" and meta["model_id"] == summary.model_id
    assert meta["federation"]["rounds"][0]["fit_results"] == 3
    assert (tmp_path / "federation-summary.json").exists()
