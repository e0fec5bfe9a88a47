"""A new user's first hour, through the real ``fednode`` command (issue 14).

Every test runs the installed console script as a subprocess, as a user would, and checks the
exit code and that the answer is one clear line (never a traceback).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from node.keycheck import META_NAME, fingerprint, key_check_value
from node.keys import derive_key
from tests.integration.test_deid_pipeline import burned_in_us
from tests.support import dicomgen
from tests.support.node import RunningNode, free_port

ROOT = Path(__file__).resolve().parents[2]


def _fednode_script() -> str:
    beside = Path(sys.executable).with_name("fednode")
    found = str(beside) if beside.exists() else shutil.which("fednode")
    if found is None:
        raise RuntimeError("the fednode command is not installed: pip install -e .")
    return found


FEDNODE = _fednode_script()


def fednode(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``fednode ARGS`` in *cwd*; the code under test is this checkout's."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}
    full_env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "100", **(env or {})})
    return subprocess.run(
        [FEDNODE, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The error line of a refused command: exit *code*, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr


def init(tmp_path: Path, *args: str) -> Path:
    proc = fednode("init", "--dir", "node", "--port", str(free_port()), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp_path / "node" / "fednode.toml"


# -- init ------------------------------------------------------------------------------------
def test_init_refuses_bad_flags_before_writing_anything(tmp_path: Path) -> None:
    err = one_line_error(fednode("init", "--dir", "n", "--port", "70000", cwd=tmp_path), 3)
    assert "--port 70000" in err and "65535" in err
    assert not (tmp_path / "n").exists()  # nothing written, so a re-run cannot keep it
    err = one_line_error(fednode("init", "--dir", "n", "--ae-title", "X" * 17, cwd=tmp_path), 3)
    assert "--ae-title" in err
    for bad in ("PACS@10.0.0.5:x", "PACS@10.0.0.5:70000", "@10.0.0.5", "PACS@"):
        err = one_line_error(fednode("init", "--dir", "n", "--peer", bad, cwd=tmp_path), 3)
        assert f"--peer '{bad}'" in err, err
    assert not (tmp_path / "n").exists()


def test_init_parses_peer_ports_and_a_rerun_changes_nothing(tmp_path: Path) -> None:
    config = init(tmp_path, "--peer", "PACS@10.0.0.5:104", "--peer", "MOD@[::1]:4242",
                  "--peer", "ECHOSCU")
    from node.config import load_settings

    peers = {p.ae_title: (p.host, p.port) for p in load_settings(config).dicom.peers}
    assert peers == {"PACS": ("10.0.0.5", 104), "MOD": ("::1", 4242), "ECHOSCU": (None, None)}
    before = config.read_bytes(), (tmp_path / "node/fednode-data/master.key").read_bytes()

    again = fednode("init", "--dir", "node", "--port", "4000", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already initialised" in again.stdout and "nothing was changed" in again.stdout
    assert "fednode serve -c" in again.stdout
    assert (config.read_bytes(), (tmp_path / "node/fednode-data/master.key").read_bytes()) == (
        before
    )


def test_init_data_dir(tmp_path: Path) -> None:
    config = init(tmp_path, "--data-dir", str(tmp_path / "var"))
    assert (tmp_path / "var" / "master.key").is_file()
    assert (tmp_path / "var" / "fednode.db").is_file()
    assert not (tmp_path / "node" / "fednode-data").exists()
    assert f'data_dir = "{tmp_path / "var"}"' in config.read_text()
    from node.cli import _default_data_dir

    # A system install (config under /etc) keeps its data out of /etc.
    assert _default_data_dir(Path("/etc/fednode")) == "/var/lib/fednode"
    assert _default_data_dir(tmp_path) == "fednode-data"


# -- overrides and configuration -------------------------------------------------------------
def test_serve_flags_pass_the_file_validation(tmp_path: Path) -> None:
    config = init(tmp_path)
    err = one_line_error(fednode("serve", "-c", str(config), "--port", "99999", cwd=tmp_path), 3)
    assert "--port 99999" in err and "OverflowError" not in err
    err = one_line_error(
        fednode("serve", "-c", str(config), "--processes", "-3", "--workers", "-1",
                cwd=tmp_path),
        3,
    )
    assert "--processes -3" in err and "--workers -1" in err
    assert "listening" not in err


def test_database_url_errors(tmp_path: Path) -> None:
    config = init(tmp_path)
    check = ("config", "check", "-c", str(config))
    err = one_line_error(
        fednode(*check, cwd=tmp_path, env={"FEDNODE_DATABASE__URL": "postgres://u:pw@db/x"}), 3
    )
    assert "postgresql+psycopg://" in err and "pw" not in err
    err = one_line_error(
        fednode(*check, cwd=tmp_path, env={"FEDNODE_DATABASE__URL": "mysql://u@db/x"}), 3
    )
    assert "mysql:// is not supported" in err
    port = free_port()  # nothing listens there
    err = one_line_error(
        fednode(*check, cwd=tmp_path,
                env={"FEDNODE_DATABASE__URL": f"postgresql+psycopg://postgres@127.0.0.1:{port}/x"}),
        5,
    )
    assert f"127.0.0.1:{port}" in err and "refused" in err.lower(), err

    missing = tmp_path / "nowhere" / "data"
    err = one_line_error(
        fednode(*check, cwd=tmp_path,
                env={"FEDNODE_DATABASE__URL": f"sqlite:///{missing}/fednode.db"}),
        5,
    )
    assert "does not exist" in err
    assert not (tmp_path / "nowhere").exists()  # a check changes nothing


def test_status_without_a_configuration(tmp_path: Path) -> None:
    err = one_line_error(fednode("status", cwd=tmp_path), 3)
    assert "no configuration" in err and "fednode init" in err
    assert "master secret" not in err


def test_train_without_local_points_at_the_federation_commands(tmp_path: Path) -> None:
    config = init(tmp_path)
    proc = fednode("train", "--task", "chest_xray", "-c", str(config), cwd=tmp_path)
    err = one_line_error(proc, proc.returncode)
    assert proc.returncode != 0 and "fednode federation" in err


# -- small things a user meets at once -------------------------------------------------------
def test_typo_hint_once_and_dash_h(tmp_path: Path) -> None:
    proc = fednode("stauts", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("Did you mean") == 1 and "'status'" in proc.stderr
    for args in (("-h",), ("jobs", "-h"), ("config", "check", "-h")):
        proc = fednode(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "Usage" in proc.stdout, (args, proc.stderr)


def test_jobs_retry_unknown_id_is_an_error(tmp_path: Path) -> None:
    config = init(tmp_path)
    err = one_line_error(fednode("jobs", "retry", "9999", "-c", str(config), cwd=tmp_path), 2)
    assert "no job has id 9999" in err and "re-queued 0" not in err


def test_echo_malformed_address_and_default_calling_ae(tmp_path: Path) -> None:
    err = one_line_error(fednode("echo", "PACS@host", cwd=tmp_path), 2)
    assert "AE@HOST:PORT" in err
    config = init(tmp_path, "--peer", "ECHOSCU@127.0.0.1")
    from tests.support.node import NodeDir

    node = NodeDir(config.parent, port=0)
    from node.config import load_settings

    node.port = load_settings(config).dicom.port
    with RunningNode(node, processes=1) as running:
        address = f"FEDNODE@127.0.0.1:{node.port}"
        ok = fednode("echo", address, "--calling-ae", "ECHOSCU", cwd=tmp_path)
        assert ok.returncode == 0 and "C-ECHO ok" in ok.stdout, ok.stderr
        err = one_line_error(fednode("echo", address, cwd=tmp_path), 7)
        assert "rejected the association" in err
        assert "calling ae title not recognised" in err.lower()
        assert "--calling-ae" in err and "'FEDNODE'" in err
        running.stop()


# -- the master secret -----------------------------------------------------------------------
def test_a_different_secret_is_refused_and_fingerprinted(tmp_path: Path) -> None:
    config = init(tmp_path)
    data = tmp_path / "node" / "fednode-data"
    master = (data / "master.key").read_bytes()
    with sqlite3.connect(data / "fednode.db") as conn:
        (stored,) = conn.execute(
            "SELECT value FROM node_meta WHERE name = ?", (META_NAME,)
        ).fetchone()
    assert stored == key_check_value(master)
    for label in ("spool/aes-gcm", "vault/aes-gcm", "pseudonym/hmac-sha256"):
        assert derive_key(master, label).hex() not in stored  # a check value, never a key
    assert master.hex() not in stored

    shown = fednode("secret", "fingerprint", "-c", str(config), cwd=tmp_path)
    assert shown.returncode == 0 and fingerprint(stored) in shown.stdout
    assert "initialised with this secret" in shown.stdout

    backup = tmp_path / "backup.key"
    shutil.copy(data / "master.key", backup)
    (data / "master.key").write_bytes(os.urandom(32))  # a valid secret, but not this node's
    for args in (("config", "check"), ("serve", "--workers", "0", "--processes", "1")):
        err = one_line_error(fednode(*args, "-c", str(config), cwd=tmp_path), 4)
        assert "not the one this database was initialised with" in err
        assert fingerprint(stored) in err
    err = fednode("secret", "fingerprint", "-c", str(config), cwd=tmp_path)
    assert err.returncode == 4 and "ANOTHER secret" in err.stdout
    by_file = fednode("secret", "fingerprint", "--file", str(backup), cwd=tmp_path)
    assert by_file.returncode == 0 and fingerprint(stored) in by_file.stdout


# -- fednode deid ----------------------------------------------------------------------------
def _secondary_capture_nm() -> Dataset:
    """A Secondary Capture instance whose Modality is NM: the SOP class triggers the gate."""
    ds = burned_in_us()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "NM"
    del ds.BurnedInAnnotation
    return ds


def test_deid_report_verbose_truncated_and_collisions(tmp_path: Path) -> None:
    config = init(tmp_path)
    src = tmp_path / "in"
    study = dicomgen.write_ct_study(src / "study", series=1, per_series=3, size=16)
    dicomgen.write(_secondary_capture_nm(), src / "sc.dcm")
    ot = burned_in_us()
    ot.Modality, ot.SOPClassUID = "OT", "1.2.840.10008.5.1.4.1.1.2"  # CT Image, modality OT
    del ot.BurnedInAnnotation
    dicomgen.write(ot, src / "ot.dcm")
    (src / "notes.txt").write_text("not DICOM")
    truncated = src / "truncated.dcm"
    truncated.write_bytes(study[0].read_bytes()[:-62])
    same_uid = src / "same-uid.dcm"  # another image under the SOP Instance UID of study[1]
    import pydicom

    ds = pydicom.dcmread(study[1])
    ds.PixelData = bytes(len(ds.PixelData))
    ds.save_as(same_uid)
    shutil.copy(study[2], src / "zz-copy.dcm")  # the very same instance again

    out = tmp_path / "out"
    report = tmp_path / "report.csv"
    proc = fednode("deid", str(src), "--out", str(out), "-c", str(config), "--report",
                   str(report), "-v", cwd=tmp_path)
    assert proc.returncode == 9, proc.stdout + proc.stderr  # the collision is an error
    with open(report, newline="") as fh:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"i0.dcm", "i1.dcm", "i2.dcm", "sc.dcm", "ot.dcm", "notes.txt",
                         "truncated.dcm", "same-uid.dcm", "zz-copy.dcm"}, rows
    assert rows["notes.txt"]["outcome"] == "skipped"
    assert rows["sc.dcm"]["outcome"] == "rejected"
    assert "the SOP class is Secondary Capture Image" in rows["sc.dcm"]["reason"]
    assert "NM" not in rows["sc.dcm"]["reason"].split("(")[1].split(")")[0]
    assert "modality OT is one of [deid] burned_in_modalities" in rows["ot.dcm"]["reason"]
    assert rows["truncated.dcm"]["outcome"] == "rejected"
    assert "truncated" in rows["truncated.dcm"]["reason"]
    assert "holds 450 bytes" in rows["truncated.dcm"]["reason"] and "needs 512" in rows[
        "truncated.dcm"]["reason"]
    # whichever of a pair comes first is written; the other is named
    pair = sorted(rows[n]["outcome"] for n in ("i1.dcm", "same-uid.dcm"))
    assert pair == ["collision", "deidentified"]
    collided = [r for r in rows.values() if r["outcome"] == "collision"]
    assert len(collided) == 1 and "also that of" in collided[0]["reason"]
    assert sorted(rows[n]["outcome"] for n in ("i2.dcm", "zz-copy.dcm")) == [
        "deidentified", "duplicate"
    ]
    done = [r for r in rows.values() if r["outcome"] == "deidentified"]
    assert all(Path(r["output"]).is_file() for r in done)
    assert len(list(out.rglob("*.dcm"))) == len(done) == 3
    for written in out.rglob("*.dcm"):
        pydicom.dcmread(written).pixel_array  # noqa: B018 - every output decodes
    # -v names each skipped and rejected file; rich keeps "[deid]" as written
    for name in ("notes.txt", "sc.dcm", "ot.dcm", "truncated.dcm"):
        assert name in proc.stdout, name
    assert "[deid] burned_in_modalities" in proc.stdout
    for line in proc.stdout.splitlines():
        if "ot.dcm" in line:
            assert "burned_in_modalities" in line  # one line, not wrapped

    as_json = tmp_path / "report.json"
    fednode("deid", str(src), "--out", str(tmp_path / "out2"), "-c", str(config), "--report",
            str(as_json), cwd=tmp_path)
    entries = json.loads(as_json.read_text())
    assert {e["outcome"] for e in entries} == {
        "deidentified", "rejected", "skipped", "collision", "duplicate"
    }
    assert set(entries[0]) == {"input", "outcome", "reason", "output"}


def test_deid_refuses_an_output_folder_inside_the_input(tmp_path: Path) -> None:
    config = init(tmp_path)
    src = tmp_path / "in"
    dicomgen.write_ct_study(src / "study", series=1, per_series=1, size=8)
    err = one_line_error(
        fednode("deid", str(src), "--out", str(src / "out"), "-c", str(config), cwd=tmp_path), 2
    )
    assert "inside the input folder" in err
    assert not (src / "out").exists()


# -- logs ------------------------------------------------------------------------------------
def _serve_log(config: Path, tmp_path: Path, fmt: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDNODE_")}
    env.update(PYTHONPATH=str(ROOT), FEDNODE_LOGGING__FORMAT=fmt, COLUMNS="80",
               FEDNODE_DICOM__HOST="127.0.0.1")
    log = tmp_path / f"serve-{fmt}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([FEDNODE, "serve", "-c", str(config), "--processes", "1",
                                 "--workers", "1"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "listening on" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    return log.read_text()


def test_logs_one_record_per_line_listening_once(tmp_path: Path) -> None:
    config = init(tmp_path, "--ae-title", "A_LONG_AE_TITLE_")
    text = _serve_log(config, tmp_path, "text")
    assert text.count("listening on") == 1, text
    (line,) = [ln for ln in text.splitlines() if "listening on" in ln]
    assert len(line) > 80 and line.rstrip().endswith(")"), line  # whole, not wrapped at 80
    stamp = line.split(" ", 1)[0]
    assert datetime.fromisoformat(stamp).utcoffset() is not None, stamp

    text = _serve_log(config, tmp_path, "json")
    records = [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line is JSON
    assert sum("listening on" in r["message"] for r in records) == 1
    for r in records:
        at = datetime.fromisoformat(r["at"])
        assert at.utcoffset() is not None and ("+" in r["at"][19:] or "-" in r["at"][19:])


def test_text_log_records_stay_on_one_line_off_a_terminal() -> None:
    import logging

    from node.logs import TextFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "two\nlines", None,
                                   sys.exc_info())
    flat = TextFormatter(one_line=True).format(record)
    assert "\n" not in flat and "two\\nlines" in flat and "ValueError: boom" in flat
    assert "\n" in TextFormatter(one_line=False).format(record)


@pytest.mark.parametrize("text", ["[tasks] enabled", "[red]not red[/]"])
def test_messages_keep_their_brackets(text: str) -> None:
    from node.cli_common import Console, plain

    console = Console(record=True, width=200)
    console.print(f"[green]ok[/] {plain(text)}")
    assert text in console.export_text()


def test_a_peer_host_with_a_port_in_the_file_is_refused(tmp_path: Path) -> None:
    config = init(tmp_path)
    text = config.read_text().replace(
        "[database]", '[[dicom.peers]]\nae_title = "PACS"\nhost = "10.0.0.5:104"\n\n[database]'
    )
    config.write_text(text)
    err = one_line_error(fednode("config", "check", "-c", str(config), cwd=tmp_path), 3)
    assert "dicom.peers.0.host" in err and "port = 104" in err
