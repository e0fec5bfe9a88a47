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


def test_dialect_specific_sql_only_in_storage() -> None:
    # import-linter cannot forbid a subpackage of an external package: read the sources.
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("node", "plugins")
        for path in (ROOT / folder).rglob("*.py")
        if "sqlalchemy.dialects" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_one_walker_of_encoded_dicom() -> None:
    # The receive check and the de-identifier share node.dicom.encoding's walker.
    import node.deid.engine as engine
    import node.dicom.encoding as encoding
    import node.dicom.inspect as inspect
    from node.errors import MalformedDataset

    assert engine.parse is encoding.parse and inspect.check is encoding.check
    assert engine.MalformedDataset is encoding.MalformedDataset is MalformedDataset
    assert not (ROOT / "node" / "deid" / "encoding.py").exists()
