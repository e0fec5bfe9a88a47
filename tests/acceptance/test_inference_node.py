"""The node end to end with encrypted inference: ``fednode serve`` with workers, a running
``fednode inference-server`` over TLS (a test CA the node is configured with,
``[inference] ca_file``), a synthetic chest study sent with DCMTK ``storescu``. The service
is down when the study completes and comes back on the same port: the ``infer`` job waits and
retries, and exactly one ``Result`` row appears, matching the plaintext model within 1e-3.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from node.inference.client import sigmoid
from node.inference.service import TokenStore
from plugins.base import resolve_task
from storage.db import Database
from storage.models import HEKey, JobRow, Result
from tests.acceptance.test_receive_node import storescu
from tests.support.dicomgen import write
from tests.support.flower import make_tls
from tests.support.inference import RunningService, train_artifact
from tests.support.node import RunningNode, free_port, init_node

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _rows(db: Database) -> tuple[list[Result], list[JobRow]]:
    with db.session() as s:
        results = list(s.execute(select(Result)).scalars())
        jobs = list(s.execute(select(JobRow).where(JobRow.kind != "deidentify")).scalars())
        s.expunge_all()
    return results, jobs


def _wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_study_sent_by_storescu_gets_one_encrypted_result_across_a_service_restart(
    tmp_path: Path,
) -> None:
    plugin = resolve_task("chest_xray")
    artifact = train_artifact(tmp_path / "models", plugin)
    state = tmp_path / "service"
    token_file = tmp_path / "node.token"
    token_file.write_text(TokenStore(state).issue("node-a") + "\n")
    os.chmod(token_file, 0o600)
    port = free_port()
    ca, cert, key = make_tls(tmp_path / "tls")
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    service = RunningService(artifact, state, port=port, extra=tls, verify=str(ca))
    assert service.url.startswith("https://")
    node = init_node(tmp_path / "node")
    env = {
        "FEDNODE_TASKS__QUIET_PERIOD_SECONDS": "1",
        "FEDNODE_TASKS__SWEEP_SECONDS": "0.5",
        "FEDNODE_WORKERS__BACKOFF_SECONDS": "1",
        "FEDNODE_WORKERS__BACKOFF_MAX_SECONDS": "4",
        "FEDNODE_WORKERS__MAX_ATTEMPTS": "50",
        "FEDNODE_INFERENCE__SERVER": service.url,
        "FEDNODE_INFERENCE__TOKEN_FILE": str(token_file),
        "FEDNODE_INFERENCE__CA_FILE": str(ca),
    }
    (study,) = plugin.synthetic_studies(1, seed=31, image_size=96)
    for i, ds in enumerate(study.datasets):
        write(ds, tmp_path / "study" / f"{i}.dcm")
    expected = sigmoid(
        float(_plaintext_logit(artifact, plugin, plugin.preprocess(list(study.datasets))))
    )
    db = Database(node.settings().database_url)
    try:
        with RunningNode(node, workers=1, env=env) as running:
            # Registration and one evaluation while the service is up, on another study
            # would also do; here the service goes down before the study completes.
            service.stop()
            sent = storescu(node, tmp_path / "study")
            assert sent.returncode == 0, sent.stderr

            def infer_failed() -> bool:
                _, jobs = _rows(db)
                return any(j.kind == "infer" and j.attempts >= 1 and j.last_error for j in jobs)

            _wait(infer_failed, 180, "the infer job to fail against the stopped service")
            results, jobs = _rows(db)
            assert results == []
            (infer_job,) = [j for j in jobs if j.kind == "infer"]
            assert infer_job.state == "queued" and "unreachable" in (infer_job.last_error or "")

            service = RunningService(artifact, state, port=port, extra=tls,
                                     verify=str(ca))  # back, same URL

            _wait(lambda: bool(_rows(db)[0]), 300, "the Result row")
            time.sleep(3)  # give a duplicate every chance to appear
            results, jobs = _rows(db)
            running.stop()
    finally:
        service.stop()
    assert len(results) == 1
    (result,) = results
    assert result.task == "chest_xray" and result.study_version == 1
    assert abs(result.probability - expected) <= 1e-3, (result.probability, expected)
    assert result.label == plugin.decide(expected).name
    assert result.model_id and result.model_id.startswith("chest_xray-1.0-")
    assert result.key_id and result.bytes_sent and result.bytes_received
    assert result.timings and result.timings["service"] > 0
    (infer_job,) = [j for j in jobs if j.kind == "infer"]
    assert infer_job.state == "done" and infer_job.attempts >= 2
    reports = [j for j in jobs if j.kind == "report"]
    assert all(j.payload == {"result_id": result.id} for j in reports) and len(reports) <= 1
    with db.session() as s:
        (key,) = s.execute(select(HEKey)).scalars()
        assert key.key_id == result.key_id
        # sealed: the serialized TenSEAL context's header is not readable in the column
        assert b"CKKS" not in key.sealed_secret and len(key.sealed_secret) > 1000
    db.dispose()


def _plaintext_logit(artifact: Path, plugin, array: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    import torch

    from node.tasks.training import load_artifact

    model, _ = load_artifact(artifact, plugin)
    model.eval()
    with torch.no_grad():
        return float(model(torch.from_numpy(array[None])).reshape(-1)[0])


def test_fednode_infer_runs_files_through_the_encrypted_path_beside_plaintext(
    tmp_path: Path,
) -> None:
    import json

    plugin = resolve_task("chest_xray")
    artifact = train_artifact(tmp_path / "models", plugin, epochs=20)
    state = tmp_path / "service"
    token_file = tmp_path / "node.token"
    token_file.write_text(TokenStore(state).issue("node-cli") + "\n")
    os.chmod(token_file, 0o600)
    studies = list(plugin.synthetic_studies(2, seed=8, image_size=96))
    for i, study in enumerate(studies):
        for j, ds in enumerate(study.datasets):
            write(ds, tmp_path / "in" / f"{i}_{j}.dcm")
    node = init_node(tmp_path / "node")
    node.extra_env["FEDNODE_INFERENCE__TOKEN_FILE"] = str(token_file)
    with RunningService(artifact, state) as service:
        proc = node.cli(
            "infer", str(tmp_path / "in"), "--task", "chest_xray", "--server", service.url,
            "--plaintext", str(artifact), "--json",
        )
    rows = json.loads(proc.stdout)
    assert len(rows) == 2
    for row in rows:
        assert row["difference"] <= 1e-3
        assert row["class"] == plugin.decide(row["plaintext_probability"]).name
        assert row["study"].startswith("2.25.")  # the de-identified study key, not the original
        assert row["bytes_sent"] > 100_000 and row["timings"]["evaluate"] > 0
    assert not {s.study_instance_uid for s in studies} & {r["study"] for r in rows}
    assert rows[0]["registration_bytes"] > 1_000_000  # registered once, on the first study
    assert rows[1]["registration_bytes"] == 0
