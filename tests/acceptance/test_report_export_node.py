"""The report/export stage in a running node (``fednode serve`` as a subprocess): the PACS is
down when the report is built, the node is SIGKILLed between report and export, the PACS comes
up, the node restarts, and the SR arrives exactly once; the CLI shows the delivery and the
study's steps.

The ``Result`` row is written by the test as the inference stage writes it, so that this test
isolates report and export (the whole mission, with encrypted inference against the real
service, is ``test_mission.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from node.deid.pseudonyms import uid_pseudonym
from plugins.chest_xray.task import ChestXrayTask
from storage.db import Database
from storage.models import DeidInstance, Report, ReportExport, Result
from tests.acceptance.test_receive_node import storescu
from tests.support.node import RunningNode, free_port, init_node
from tests.support.reports import StoreSCP

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _wait(predicate, timeout: float = 60, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sr_arrives_exactly_once_across_pacs_outage_and_sigkill(tmp_path: Path) -> None:
    pacs_port = free_port()
    node = init_node(
        tmp_path / "node",
        extra_toml=(
            "[[export.destinations]]\n"
            'name = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
            f"port = {pacs_port}\n"
        ),
    )
    node.extra_env.update(
        {
            # No assembly (no infer job): the test writes the result itself.
            "FEDNODE_TASKS__QUIET_PERIOD_SECONDS": "3600",
            "FEDNODE_WORKERS__BACKOFF_SECONDS": "0.5",
            "FEDNODE_WORKERS__BACKOFF_MAX_SECONDS": "1",
            "FEDNODE_EXPORT__SWEEP_SECONDS": "0.2",
            "FEDNODE_EXPORT__TIMEOUT_SECONDS": "3",
        }
    )
    (study,) = ChestXrayTask().synthetic_studies(1, seed=3, image_size=64)
    files = []
    for i, ds in enumerate(study.datasets):
        path = tmp_path / "study" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    db = Database(node.settings().database_url)
    study_key = uid_pseudonym(node.keys().site, study.study_instance_uid)

    def count(model: type, *where) -> int:  # type: ignore[no-untyped-def]
        with db.session() as s:
            return int(s.execute(select(func.count()).select_from(model).where(*where))
                       .scalar_one())

    with RunningNode(node, workers=1) as running:
        sent = storescu(node, *files)
        assert sent.returncode == 0, sent.stderr
        _wait(lambda: count(DeidInstance) == len(files), what="de-identification")
        with db.session() as s:
            s.add(Result(study_key=study_key, task="chest_xray", study_version=1,
                         label="pneumonia", probability=0.77, model_id="m-1",
                         model_version="1"))
        _wait(lambda: count(ReportExport, ReportExport.last_error.is_not(None)) == 1,
              what="a failed attempt")
        running.kill()  # between report and export: the PACS has nothing yet
    with db.session() as s:
        delivery = s.execute(select(ReportExport)).scalar_one()
    assert delivery.state == "queued" and "cannot associate" in (delivery.last_error or "")

    with StoreSCP(tmp_path / "pacs", port=pacs_port) as pacs, RunningNode(node, workers=1):
        received = pacs.wait_for(1, timeout=90)
        _wait(lambda: count(Report, Report.state == "exported") == 1, what="exported")
        time.sleep(2)  # a duplicate would arrive now
        assert len(pacs.received()) == 1
        listing = json.loads(node.cli("exports", "list", "--json").stdout)
        status = json.loads(node.cli("status", "--json").stdout)
    (sr,) = received
    original = study.datasets[0]
    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID"):
        assert str(sr[keyword].value) == str(original[keyword].value), keyword
    assert listing[0]["state"] == "sent" and listing[0]["attempts"] >= 2
    assert listing[0]["study_key"] == study_key
    (progress,) = [p for p in status["studies"] if p["study_key"] == study_key]
    assert progress["step"] == "exported"
    # The outbox keeps the SR encrypted until the retention passes.
    (item,) = (node.settings().outbox_dir).glob("*.sr")
    assert str(original.PatientID).encode() not in item.read_bytes()
    assert dcmread(next((tmp_path / "pacs").iterdir())).SOPInstanceUID == sr.SOPInstanceUID
    db.dispose()
