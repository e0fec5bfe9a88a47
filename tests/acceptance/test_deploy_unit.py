"""The systemd unit in deploy/ is one systemd accepts, and it runs what the README says."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "deploy" / "systemd" / "fednode.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    fednode = shutil.which("fednode")
    if analyze is None or fednode is None:
        pytest.skip("systemd-analyze or the fednode command is not installed")
    # verify checks that ExecStart names an executable: point it at this machine's fednode.
    unit = tmp_path / "fednode.service"
    unit.write_text(UNIT.read_text().replace("/opt/fednode/bin/fednode", fednode))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    problems = [
        line for line in (proc.stdout + proc.stderr).splitlines()
        # systemd inside a container without a running manager warns about itself, not the unit
        if "fednode.service" in line
    ]
    assert proc.returncode == 0 and problems == [], proc.stdout + proc.stderr


def test_unit_runs_serve_with_a_config_check_first_and_stops_with_sigterm() -> None:
    text = UNIT.read_text()
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["ExecStart"].endswith("fednode serve")
    assert lines["ExecStartPre"].endswith("fednode config check")
    assert lines["KillSignal"] == "SIGTERM" and lines["User"] == "fednode"
    assert "FLWR_TELEMETRY_ENABLED=0" in lines["Environment"] or \
        "FLWR_TELEMETRY_ENABLED=0" in text
    # Workers may return to nice 0 while they hold the write turn (storage/turn.py).
    assert lines["LimitNICE"] == "+0"
    # The stop timeout leaves room for the node's own grace period (30 s by default).
    assert int(lines["TimeoutStopSec"]) > 30
