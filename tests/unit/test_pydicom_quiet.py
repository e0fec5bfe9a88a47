"""pydicom's logger and warnings quote the values they find invalid: none reaches the node's log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRETS = ["DOE^SECRETNAME" * 6, "1.2.840.SECRET.9", "19XX0101", "ABCDEFGHIJKLMNOPQRSTUVWXYZSECRET"]


def test_pydicom_values_never_reach_the_log() -> None:
    code = textwrap.dedent(
        f"""
        import logging, warnings
        from node.logs import configure_logging
        configure_logging("DEBUG", "text")
        import pydicom  # imported after the set-up: pydicom resets its own logger's level
        from pydicom import config
        from pydicom.valuerep import validate_value
        config.settings.reading_validation_mode = config.WARN
        values = {SECRETS!r}
        for vr, value in zip(("PN", "UI", "DA", "SH"), values):
            validate_value(vr, value, config.WARN)  # logs to "pydicom" and warns
        # the lenient read of a dataset with invalid values, as the repair path does it
        from pydicom.dataset import Dataset
        ds = Dataset()
        ds.PatientName = values[0]
        ds.StudyInstanceUID = values[1]
        ds.PatientBirthDate = values[2]
        logging.getLogger("pydicom").warning("direct %s", values[3])
        logging.getLogger("node.test").warning("node line")
        warnings.warn("a library warning quoting '%s'" % values[3])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    log = out.stdout + out.stderr
    assert "node line" in log  # the node's own records still pass
    assert "a library warning quoting <value>" in log  # warnings are logged, redacted
    for secret in SECRETS:
        assert secret not in log, secret
        assert secret[:12] not in log, secret
