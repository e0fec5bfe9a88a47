"""``deploy/quickstart.sh`` as a new user runs it: into a virtual environment, with ``python3``
only (no ``python`` on PATH), twice (re-runnable), and stopped with Ctrl-C. Each run shows the
whole mission: a study in, encrypted inference, the Structured Report back in the PACS.

The venv is made with ``--system-site-packages`` so that the installation step resolves every
dependency from this machine's packages (the test suite runs offline); everything else is the
script exactly as the README gives it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.node import free_port

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "python3"
    if not link.exists():
        link.symlink_to(sys.executable)
    env = {
        "HOME": os.environ.get("HOME", "/root"),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "FEDNODE_VENV": str(tmp_path / "venv"),
        "FEDNODE_VENV_OPTIONS": "--system-site-packages",
        "QUICKSTART_DIR": str(tmp_path / "qs"),
        **extra,
    }
    for key in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _start(tmp_path: Path, port: int, **extra: str) -> tuple[subprocess.Popen[str], Path]:
    log = tmp_path / f"quickstart-{time.time_ns()}.log"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            ["bash", "deploy/quickstart.sh", str(port)], cwd=ROOT, env=_env(tmp_path, **extra),
            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
    return proc, log


def _wait_for(proc: subprocess.Popen[str], log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"quickstart exited {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.3)


def _nothing_listens(port: int) -> bool:
    """No node was left behind on *port*."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


def _ctrl_c(proc: subprocess.Popen[str]) -> int:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(90)


@pytest.mark.slow
def test_quickstart_in_a_venv_twice_then_ctrl_c(tmp_path: Path) -> None:
    assert not any((Path(d) / "python").exists() for d in _env(tmp_path)["PATH"].split(":"))
    port = free_port()
    first, log = _start(tmp_path, port, QUICKSTART_STAY="0")
    assert first.wait(900) == 0, log.read_text()
    out = log.read_text()
    assert "creating the virtual environment" in out
    assert (tmp_path / "venv" / "bin" / "fednode").exists()
    assert "Comprehensive 3D SR Document" in out, out  # dsrdump of what the PACS received
    assert "Completion Flag     : PARTIAL" in out and "(233604007,SCT,\"Pneumonia\")" in out
    assert "-> exported" in out and "inferred" in out, out  # the steps' timings
    assert "source " + str(tmp_path / "venv") + "/bin/activate" in out
    assert all(_nothing_listens(p) for p in (port, port + 1, port + 2, port + 3))

    second, log = _start(tmp_path, port)
    _wait_for(second, log, "keeps running", 600)
    assert _ctrl_c(second) == 0, log.read_text()
    out = log.read_text()
    assert "reusing the virtual environment" in out and "reusing the node" in out
    assert "reusing the model owner's model" in out and "not empty" not in out, out
    assert out.count("Comprehensive 3D SR Document") == 1, out  # a new patient, a new report
    assert "stopped" in out
    assert all(_nothing_listens(p) for p in (port, port + 1, port + 2, port + 3))

    third, log = _start(tmp_path, port)
    _wait_for(third, log, "installing fednode", 120)
    assert _ctrl_c(third) == 130, log.read_text()  # interrupted during the set-up
    assert _nothing_listens(port)


def test_quickstart_folder_is_ignored_by_git() -> None:
    proc = subprocess.run(["git", "check-ignore", "-q", "quickstart/fednode-data/master.key"],
                          cwd=ROOT, capture_output=True)
    assert proc.returncode == 0
