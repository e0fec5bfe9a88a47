"""The layers of node.dicom: importing changes nothing in pynetdicom; the set-up is explicit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
        check=True, timeout=120,
    )
    return out.stdout.strip()


def test_importing_node_dicom_has_no_side_effects_on_pynetdicom() -> None:
    out = _run(
        """
        import pynetdicom.utils
        from pynetdicom import _config
        before = (_config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS,
                  _config.STORE_RECV_CHUNKED_DATASET, pynetdicom.utils.set_uid)
        import node.dicom.scp, node.dicom.scu, node.dicom.fastpath, node.dicom.sockets
        import node.dicom.receive, node.dicom.configure
        after = (_config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS,
                 _config.STORE_RECV_CHUNKED_DATASET, pynetdicom.utils.set_uid)
        print(before == after)
        node.dicom.configure.configure_pynetdicom()
        node.dicom.configure.configure_pynetdicom()  # idempotent
        print(_config.LOG_HANDLER_LEVEL, _config.LOG_REQUEST_IDENTIFIERS,
              _config.LOG_RESPONSE_IDENTIFIERS, _config.STORE_RECV_CHUNKED_DATASET,
              getattr(pynetdicom.utils.set_uid, "_fednode_cached", False))
        """
    )
    assert out.splitlines() == ["True", "none False False False True"]


def test_the_scu_entry_point_applies_the_set_up() -> None:
    out = _run(
        """
        from pynetdicom import _config
        from node.dicom.scu import PeerAddress, echo
        from node.errors import NetworkError
        try:  # nothing listens on port 1: the set-up is applied before connecting
            echo(PeerAddress("X", "127.0.0.1", 1), calling_ae="FEDNODE", timeout=1)
        except NetworkError:
            pass
        print(_config.LOG_REQUEST_IDENTIFIERS, _config.LOG_HANDLER_LEVEL)
        """
    )
    assert out == "False none"
