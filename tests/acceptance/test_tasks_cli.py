"""The task commands as a user runs them: ``fednode synth``, ``labels import``, ``labels list``
and ``train --local``, each a subprocess against an initialised node.

The node's de-identification is stood in for by :class:`tests.support.storage.DeidStore`
(with the node's own keys), which stores the synthetic studies as de-identification would.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from node.runtime import open_context
from tests.support.node import init_node, run_cli
from tests.support.storage import DeidStore

STUDIES = 200


@pytest.mark.slow
def test_synth_label_and_train_from_the_command_line(tmp_path: Path) -> None:
    node = init_node(tmp_path / "node")
    out = tmp_path / "synthetic"
    run_cli(
        "synth",
        "--task",
        "chest_xray",
        "--studies",
        str(STUDIES),
        "--out",
        str(out),
        "--size",
        "64",
        "--seed",
        "2",
    )

    readme = (out / "README.txt").read_text()
    assert readme.startswith("SYNTHETIC DATA - NOT REAL PATIENTS")
    with open(out / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == STUDIES
    assert set(rows[0]) == {"study_instance_uid", "accession_number", "chest_xray"}
    assert {r["chest_xray"] for r in rows} == {"pneumonia", "no_pneumonia"}
    files = sorted(out.glob("studies/*/*.dcm"))
    assert len(files) >= STUDIES
    first = dcmread(files[0])
    assert "SYNTHETIC" in first.StudyDescription and "SYNTHETIC" in first.ImageComments
    assert first.Modality in ("DX", "CR") and first.BitsAllocated == 16
    assert first.StudyInstanceUID == rows[0]["study_instance_uid"]
    assert str(first.PatientName) and first.PatientID.startswith("SYN")
    # the same seed gives the same studies
    again = tmp_path / "again"
    run_cli("synth", "--studies", "3", "--out", str(again), "--size", "64", "--seed", "2")
    assert (again / "studies/0001/1-1.dcm").read_bytes() == (
        out / "studies/0001/1-1.dcm"
    ).read_bytes()
    refused = run_cli("synth", "--studies", "1", "--out", str(out), check=False)
    assert refused.returncode == 1 and "not empty" in refused.stderr

    # store all but ten studies, as de-identification would
    ctx = open_context(node.settings())
    store = DeidStore(ctx)
    held_back = {r["study_instance_uid"] for r in rows[-10:]}
    for path in files:
        ds = dcmread(path)
        if ds.StudyInstanceUID not in held_back:
            store.add(ds)

    failed = node.cli("labels", "import", str(out / "labels.csv"), check=False)
    assert failed.returncode == 1
    assert "10 unknown key(s)" in failed.stderr
    assert "matches no stored study" in failed.stdout
    assert all(uid not in failed.stdout + failed.stderr for uid in held_back)

    imported = node.cli("labels", "import", str(out / "labels.csv"), "--skip-unknown", "--json")
    report = json.loads(imported.stdout)
    assert report["imported"] and report["inserted"] == STUDIES - 10
    listed = json.loads(node.cli("labels", "list", "--json").stdout)
    assert sum(c["studies"] for c in listed) == STUDIES - 10
    assert all(c["with_images"] == c["studies"] for c in listed)
    table = node.cli("labels", "list").stdout
    assert "chest_xray" in table and "no_pneumonia" in table

    usage = node.cli("train", "--task", "chest_xray", check=False)
    assert usage.returncode == 2 and "--local" in usage.stderr
    unknown = node.cli("train", "--local", "--task", "nope", check=False)
    assert unknown.returncode == 10 and "not enabled" in unknown.stderr

    trained = node.cli("train", "--local", "--task", "chest_xray", "--json")
    result = json.loads(trained.stdout)
    assert result["n_train"] + result["n_holdout"] == STUDIES - 10
    # `init` draws a fresh master secret, so the study keys and hence the split differ per run;
    # over seven such nodes the held-out AUC (48 studies) ranged 0.77-0.97, mean 0.90. The
    # pinned-split target (AUC >= 0.9 on 320 studies) lives in tests/integration/test_training.py;
    # here the bar is "clearly learned", four spreads below that mean.
    assert result["holdout"]["auc"] >= 0.7
    assert Path(result["artifact"]).is_file()
    assert Path(result["artifact"]).parent == node.settings().models_dir
    shown = node.cli("train", "--local", "--task", "chest_xray", "--epochs", "2")
    for metric in ("AUC", "accuracy", "sensitivity", "specificity", "MCC"):
        assert metric in shown.stdout


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_synthetic_files_validate_with_dciodvfy(tmp_path: Path) -> None:
    out = tmp_path / "synthetic"
    run_cli("synth", "--studies", "12", "--out", str(out), "--size", "128", "--seed", "9")
    files = sorted(out.glob("studies/*/*.dcm"))
    kinds = set()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        kinds.add((ds.Modality, ds.PhotometricInterpretation, ds.ViewPosition))
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = proc.stdout + proc.stderr
        assert "Error" not in report, f"{path.name}:\n{report}"
    assert {m for m, _, _ in kinds} == {"DX", "CR"}
