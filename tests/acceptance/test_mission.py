"""The whole mission on loopback, with real parts only: DCMTK ``storescu`` → ``fednode serve``
→ de-identification → assembly → encrypted inference against the real inference service
(``fednode inference-server``, CKKS) → TID 1500 SR → DCMTK ``storescp`` as the PACS.

The SR the PACS receives must be filed under the original patient and study, reference the
original instances, carry no pseudonym of the node, validate with dciodvfy and read back with
highdicom; its probability is the result the node decrypted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import highdicom
import pytest
from pydicom import dcmread
from sqlalchemy import select

from node.deid.pseudonyms import token, uid_pseudonym
from plugins.chest_xray.task import ChestXrayTask
from storage.blobs import BlobStore
from storage.db import Database
from storage.models import DeidInstance, Report, Result, Series, Study
from tests.acceptance.test_receive_node import storescu
from tests.support.node import RunningNode, fednode_cmd, init_node
from tests.support.reports import StoreSCP, dciodvfy_errors

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def make_artifact(folder: Path) -> Path:
    """A (seeded, untrained) chest model artifact, as ``fednode train`` would save it."""
    import torch

    from node.tasks.training import save_artifact
    from plugins.base import architecture_hash

    torch.manual_seed(0)
    plugin = ChestXrayTask()
    model = plugin.build_model()
    meta = {"task": plugin.name, "task_version": plugin.version,
            "architecture_hash": architecture_hash(plugin, model), "model_version": "test-1"}
    path, _ = save_artifact(folder, plugin, model, meta)
    return path


class InferenceServer:
    """``fednode inference-server`` on a free loopback port, with a token for one node."""

    def __init__(self, root: Path, artifact: Path) -> None:
        self.state = root / "state"
        self.log = root / "server.log"
        root.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(
            fednode_cmd("inference-server", "--model", str(artifact), "--port", "0",
                        "--state-dir", str(self.state)),
            stdout=self._fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "300"},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = self.log.read_text()
            found = re.search(r"listening on (http://\S+)", text)
            if found:
                self.url = found.group(1)
                break
            if self.proc.poll() is not None:
                raise AssertionError("inference-server exited:\n" + text)
            time.sleep(0.2)
        else:
            raise AssertionError("inference-server did not start:\n" + self.log.read_text())

    def token_file(self, node: str, path: Path) -> Path:
        out = subprocess.run(
            fednode_cmd("inference-server", "token", "issue", node, "--state-dir",
                        str(self.state)),
            capture_output=True, text=True, check=True,
        )
        path.write_text(out.stdout.strip().splitlines()[-1] + "\n")
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self._fh.close()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_study_in_encrypted_inference_sr_back_in_the_pacs(tmp_path: Path) -> None:
    (study,) = ChestXrayTask().synthetic_studies(1, seed=17, image_size=64)
    files = []
    for i, ds in enumerate(study.datasets):
        path = tmp_path / "study" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    server = InferenceServer(tmp_path / "service", make_artifact(tmp_path / "models"))
    try:
        with StoreSCP(tmp_path / "pacs") as pacs:
            node = init_node(
                tmp_path / "node",
                extra_toml=(
                    "[[export.destinations]]\n"
                    f'ae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                ),
            )
            node.extra_env.update({
                "FEDNODE_INFERENCE__SERVER": server.url,
                "FEDNODE_INFERENCE__TOKEN_FILE": str(
                    server.token_file("hospital-a", tmp_path / "token")
                ),
                "FEDNODE_TASKS__QUIET_PERIOD_SECONDS": "1",
                "FEDNODE_TASKS__SWEEP_SECONDS": "0.5",
            })
            with RunningNode(node, workers=1):
                sent = storescu(node, *files)
                assert sent.returncode == 0, sent.stderr
                (sr,) = pacs.wait_for(1, timeout=120)
                status = node.cli("status").stdout
    finally:
        server.stop()

    original = study.datasets[0]
    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID"):
        assert str(sr[keyword].value) == str(original[keyword].value), keyword
    received = tmp_path / "received.dcm"
    sr.save_as(received)
    assert dciodvfy_errors(received) == []
    back = highdicom.sr.srread(received)
    plugin = ChestXrayTask()
    assert {uid for _, _, uid, _ in back.get_evidence()} == {
        str(ds.SOPInstanceUID) for ds in study.datasets if plugin.accepts(ds)
    }

    settings = node.settings()
    db = Database(settings.database_url)
    keys = node.keys()
    site = keys.site
    study_key = uid_pseudonym(site, study.study_instance_uid)
    with db.session() as s:
        result = s.execute(select(Result).where(Result.study_key == study_key)).scalar_one()
        report = s.execute(select(Report)).scalar_one()
        row = s.get(Study, study_key)
        sop_keys = list(s.execute(select(DeidInstance.sop_key)).scalars())
        refs = list(s.execute(select(DeidInstance.blob_ref)).scalars())
        series = list(s.execute(select(Series.series_key)).scalars())
    db.dispose()
    assert report.state == "exported" and result.probability is not None
    group = back.content.get_image_measurement_groups()[0]
    (measurement,) = group.get_measurements()
    assert measurement.value == pytest.approx(result.probability, abs=1e-6)
    f = plugin.finding
    (evaluation,) = group.get_qualitative_evaluations(
        name=highdicom.sr.CodedConcept(f.value, f.scheme_designator, f.meaning)
    )
    assert evaluation.value.value == plugin.decide(result.probability).concept.value
    assert result.model_id is not None and result.model_id.encode() in received.read_bytes()

    # No pseudonym of the node: keys, tokens and the de-identified header's identifiers.
    deid = dcmread(BytesIO(BlobStore(settings.blob_dir, keys.blobs).get(refs[0])))
    assert deid.PatientID != original.PatientID
    pseudonyms = [study_key, *sop_keys, *series, str(deid.PatientID), str(deid.PatientName),
                  str(deid.StudyInstanceUID), token(site, "patient-id", str(original.PatientID))]
    pseudonyms += [k for k in (row.patient_key, row.accession_key) if k]  # type: ignore[union-attr]
    data = received.read_bytes()
    for pseudonym in pseudonyms:
        assert pseudonym and pseudonym.encode() not in data, "a pseudonym of the node is in the SR"
    assert "exported" in status
    assert sys.executable  # the node ran under this interpreter (fednode_cmd)
