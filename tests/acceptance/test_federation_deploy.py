"""A real Flower deployment on loopback: ``flower-superlink`` with TLS and SuperNode
authentication, fednode nodes enrolled and joined through the CLI, the reference ServerApp
run with ``flwr run deploy/federation``.

- two registered nodes with approved bundles train two rounds; the run completes and every
  round aggregated both nodes (a Flower run ends "completed" even when nodes fail, so the
  aggregation counts in the run's summary are what is checked), and the final artifact loads;
- a node whose key was not registered is refused by the SuperLink and its supervisor keeps
  restarting it;
- a bundle the nodes did not approve does not run: its ClientApp module would write a marker
  file when imported, and the marker never appears; no round aggregates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import load_settings
from node.runtime import open_context
from plugins.base import resolve_task
from tests.support.federation import populate
from tests.support.flower import Coordinator, start_coordinator
from tests.support.node import NodeDir, fednode_cmd, free_port, init_node

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "deploy" / "federation"


def _node(root: Path, index: int, coord: Coordinator, studies: int) -> NodeDir:
    nd = init_node(root, extra_toml=f"[federation]\nruntime_port = {free_port()}\n")
    if studies:
        ctx = open_context(load_settings(nd.config))
        populate(ctx, resolve_task("chest_xray"), studies, seed=700 + index, prevalence=0.5)
    out = nd.cli(
        "federation",
        "enroll",
        "--superlink",
        coord.address,
        "--ca-cert",
        str(coord.ca),
        "--name",
        f"site{index}",
        "--json",
    )
    info = json.loads(out.stdout)
    key = Path(info["public_key_file"])
    assert info["register_command"].startswith(f"flwr supernode register {key.name} ")
    assert info["fingerprint"].startswith("SHA256:") and info["public_key"].startswith(
        "ecdsa-sha2-nistp384 "
    )
    private = key.with_suffix("")
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    return nd


def _build(source: Path, out: Path, coord: Coordinator) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["flwr", "build", "--app", str(source)],
        cwd=out,
        env=coord.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return next(out.glob("*.fab"))


def _wait_run(coord: Coordinator, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        runs = json.loads(coord.flwr("ls", "fed", "--format", "json").stdout)["runs"]
        status = next(r["status"] for r in runs if r["run-id"] == run_id)
        if status.startswith("finished"):
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} still {status} after {timeout} s")


def _start_run(coord: Coordinator, app: Path, config: str) -> str:
    out = coord.flwr("run", str(app), "fed", "--run-config", config, "--format", "json")
    return str(json.loads(out.stdout)["run-id"])


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("federation")
    coord = start_coordinator(root / "coordinator")
    joins: list[subprocess.Popen[bytes]] = []
    try:
        nodes = [_node(root / f"node{i}", i, coord, 32) for i in range(2)]
        stranger = _node(root / "stranger", 9, coord, 0)
        for nd in nodes:  # the coordinator registers only the two sites
            key = next(nd.root.rglob("node_key.pub"))
            out = coord.flwr("supernode", "register", str(key), "fed")
            assert "registered successfully" in out.stdout
        fab = _build(APP, root / "fab", coord)
        for nd in nodes:
            assert "approved" in nd.cli("federation", "approve", str(fab)).stdout
        for nd in [*nodes, stranger]:
            joins.append(
                subprocess.Popen(
                    fednode_cmd("federation", "join", "-c", str(nd.config)),
                    env={**os.environ, **nd.env()},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        yield {"root": root, "coord": coord, "nodes": nodes, "stranger": stranger, "fab": fab}
    finally:
        for j in joins:
            j.terminate()
        for j in joins:
            try:
                j.wait(timeout=30)
            except subprocess.TimeoutExpired:
                j.kill()
        coord.stop()


def test_two_enrolled_nodes_train_two_rounds_through_the_superlink(deployment) -> None:  # type: ignore[no-untyped-def]
    coord: Coordinator = deployment["coord"]
    root: Path = deployment["root"]
    artifacts = root / "artifacts"
    run_id = _start_run(
        coord, APP, f'num-rounds=2 min-nodes=2 local-epochs=2 artifact-dir="{artifacts}"'
    )
    assert _wait_run(coord, run_id, 400) == "finished:completed"
    summary = json.loads((artifacts / "federation-summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:  # both nodes aggregated in both rounds, none failed
        assert (r["fit_results"], r["fit_failures"]) == (2, 0)
        assert (r["evaluate_results"], r["evaluate_failures"]) == (2, 0)
        assert r["train_examples"] == 2 * 24  # 32 studies per node, a quarter held out
        assert 0.0 <= r["auc"] <= 1.0
    assert summary["completed_rounds"] == 2
    from node.tasks.training import load_artifact

    _model, meta = load_artifact(Path(summary["artifact"]), resolve_task("chest_xray"))
    assert meta["source"] == "federated" and meta["federation"]["completed_rounds"] == 2
    for nd in deployment["nodes"]:
        status = json.loads(nd.cli("federation", "status", "--json").stdout)
        assert status["registration"].startswith("registered")
        assert status["connectivity"] == "reachable, TLS certificate verified"
        log = next(nd.root.rglob("supernode.log")).read_text()
        assert "trained on 24 studies" in log


def test_a_node_whose_key_is_not_registered_is_refused(deployment) -> None:  # type: ignore[no-untyped-def]
    stranger: NodeDir = deployment["stranger"]
    deadline = time.monotonic() + 60
    status: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = json.loads(stranger.cli("federation", "status", "--json").stdout)
        sup = status.get("supervisor") or {}
        restarts = sup.get("children", {}).get("supernode", {}).get("restarts", 0)  # type: ignore[union-attr]
        if str(status["registration"]).startswith("refused") and restarts >= 1:
            break
        time.sleep(2)
    assert str(status["registration"]).startswith("refused"), status
    assert status["connectivity"] == "reachable, TLS certificate verified"
    log = next(stranger.root.rglob("supernode.log")).read_text()
    assert "SuperNode ID:" not in log


def test_a_bundle_that_was_not_approved_does_not_run(deployment, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    coord: Coordinator = deployment["coord"]
    marker = tmp_path / "the-unapproved-clientapp-ran"
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    # Imported where it runs: it leaves a file in that process's FLWR_HOME; handling a
    # message leaves the marker.
    (app / "evil_client.py").write_text(
        "import os\n"
        "from pathlib import Path\n"
        "from flwr.client import ClientApp\n"
        "from node.federated import client as fednode_client\n"
        "Path(os.environ.get('FLWR_HOME', '.'), 'evil-imported').write_text('imported')\n"
        "def client_fn(context):\n"
        f"    Path({str(marker)!r}).write_text('ran')\n"
        "    return fednode_client.client_fn(context)\n"
        "app = ClientApp(client_fn=client_fn, mods=fednode_client.MODS)\n"
    )
    toml = (app / "pyproject.toml").read_text()
    toml = toml.replace('clientapp = "node.federated.client:app"', 'clientapp = "evil_client:app"')
    (app / "pyproject.toml").write_text(toml.replace('version = "1.0.0"', 'version = "1.0.1"'))
    artifacts = tmp_path / "artifacts"
    run_id = _start_run(
        coord,
        app,
        f'num-rounds=1 min-nodes=2 local-epochs=1 secagg=false artifact-dir="{artifacts}"',
    )
    status = _wait_run(coord, run_id, 300)
    assert status.startswith("finished")
    assert not marker.exists()
    for nd in deployment["nodes"]:
        assert not list(nd.root.rglob("evil-imported"))
        assert not list(nd.root.rglob("evil_client.py"))  # never even unpacked
    summary_path = artifacts / "federation-summary.json"
    if summary_path.exists():  # the ServerApp saves nothing without an aggregate
        summary = json.loads(summary_path.read_text())
        assert summary["completed_rounds"] == 0
    for nd in deployment["nodes"]:
        log = next(nd.root.rglob("supernode.log")).read_text()
        assert "is not approved on this node; refused" in log
