"""``fednode deid``: offline de-identification with the node's profile and keys."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from node.deid.commands import register
from node.jobs import parse_payload
from node.keys import create_master_secret, load_keys
from node.pipeline.deidentify import deidentify_job
from tests.integration.test_deid_pipeline import burned_in_us, make_ctx, receive
from tests.support import dicomgen
from tests.unit.deid_support import ct


def _node(tmp_path: Path) -> Path:
    config = tmp_path / "fednode.toml"
    config.write_text('[node]\ndata_dir = "data"\n\n[deid]\npatient_prefix = "ZZ"\n')
    create_master_secret(tmp_path / "data" / "master.key")
    return config


def _inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    src = tmp_path / "in"
    paths = dicomgen.write_ct_study(src / "study", series=2, per_series=2, size=8)
    dicomgen.write(burned_in_us(), src / "us.dcm")
    (src / "notes.txt").write_text("not DICOM")
    return src, paths


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # keep "deid" a sub-command
        pass

    return app


def test_deid_command(tmp_path: Path) -> None:
    config = _node(tmp_path)
    src, paths = _inputs(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["deid", str(src), "--out", str(out), "-c", str(config)])
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│┃┌┐└┘├┤─━┏┓┗┛┡┩╇┼┬┴]+", " ", result.output)
    assert "de-identified 4 " in flat and "rejected 1 " in flat, flat
    assert "skipped (not DICOM) 1 " in flat and "no pixel rule matches" in flat, flat
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == len(paths) == 4
    assert not (out / "uid_map.csv").exists() and not (out / "patient_map.csv").exists()
    for f in files:
        data = f.read_bytes()
        assert b"DOE^JANE" not in data and b"MRN0012345" not in data
        assert f.parent.parent.name.startswith("2.25.") and f.name.startswith("2.25.")


def test_deid_command_writes_the_maps_only_when_asked(tmp_path: Path) -> None:
    config = _node(tmp_path)
    src, _ = _inputs(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        _app(), ["deid", str(src), "--out", str(out), "-c", str(config), "--write-maps"]
    )
    assert result.exit_code == 0, result.output
    assert "hold PHI" in result.output
    uid_map = (out / "uid_map.csv").read_text().splitlines()
    patient_map = (out / "patient_map.csv").read_text().splitlines()
    assert uid_map[0] == "old,new" and len(uid_map) > 5
    assert patient_map[0] == "old,new,old_name,new_name"
    assert patient_map[1].startswith("MRN0012345,ZZ")
    for name in ("uid_map.csv", "patient_map.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600


def test_same_bytes_as_the_pipeline(tmp_path: Path) -> None:
    config = _node(tmp_path)
    keys = load_keys(tmp_path / "data" / "master.key")
    ds = ct()
    path = dicomgen.write(ds, tmp_path / "in" / "one.dcm")
    out = tmp_path / "out"
    result = CliRunner().invoke(_app(), ["deid", str(path), "--out", str(out), "-c", str(config)])
    assert result.exit_code == 0, result.output
    (written,) = list(out.rglob("*.dcm"))

    ctx = make_ctx(tmp_path / "node", master=(tmp_path / "data" / "master.key").read_bytes(),
                   patient_prefix="ZZ")
    assert ctx.keys.site == keys.site
    instance_id = receive(ctx, ds)
    job = ctx.queue.lease("test", ["deidentify"], 60)
    assert job is not None
    deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    with ctx.db.session() as s:
        from storage.models import Instance

        row = s.get(Instance, instance_id)
        assert row is not None and row.blob_ref is not None
        ref = row.blob_ref
    assert ctx.blobs.get(ref) == written.read_bytes()


def test_fednode_deid_as_a_subprocess(tmp_path: Path) -> None:
    """The real entry point (the lead's ``node.cli`` registers this command)."""
    config = _node(tmp_path)
    src, _ = _inputs(tmp_path)
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "deid", str(src), "--out", str(out),
         "--config", str(config)],
        capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(out.rglob("*.dcm"))) == 4
