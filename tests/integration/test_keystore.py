"""The node's CKKS keys: sealed at rest, rotated on schedule, old keys kept for their results."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from node.inference.keystore import KeyStore, KeyStoreError
from node.keys import NodeKeys
from plugins.chest_xray.task import ChestXrayTask
from plugins.he import choose_parameters, he_circuit
from storage.db import Database
from storage.models import HEKey


def test_keys_are_sealed_rotated_and_old_ones_stay_readable(sqlite_db: Database) -> None:
    sqlite_db.upgrade()
    task = ChestXrayTask()
    torch.manual_seed(0)
    params = choose_parameters(he_circuit(task, task.build_model()), (-1.0, 1.0))
    keys = NodeKeys.from_master(os.urandom(32))
    store = KeyStore(sqlite_db, keys.he, timedelta(days=30))
    t0 = datetime.now(UTC)
    first_id, first = store.current(task.name, params, now=t0)
    again_id, _ = store.current(task.name, params, now=t0 + timedelta(days=29))
    assert again_id == first_id  # within the key period: the same key

    with sqlite_db.session() as s:
        sealed = s.execute(select(HEKey.sealed_secret).where(HEKey.key_id == first_id)).scalar_one()
    assert first.serialize_secret() not in sealed  # never stored in clear

    second_id, _ = store.current(task.name, params, now=t0 + timedelta(days=31))
    assert second_id != first_id
    with sqlite_db.session() as s:
        rows = {r.key_id: r.retired_at for r in s.execute(select(HEKey)).scalars()}
    assert rows[first_id] is not None and rows[second_id] is None
    # A result encrypted under the retired key can still be decrypted (a fresh process).
    fresh = KeyStore(sqlite_db, keys.he, timedelta(days=30))
    assert fresh.get(first_id, params).serialize_secret() == first.serialize_secret()

    other = KeyStore(sqlite_db, NodeKeys.from_master(os.urandom(32)).he, timedelta(days=30))
    with pytest.raises(KeyStoreError, match="failed authentication"):
        other.get(first_id, params)


_RESTARTED_NODE = """
import os, sys
from datetime import timedelta
import tenseal as ts
import torch
from node.inference.keystore import KeyStore
from node.keys import NodeKeys
from plugins.chest_xray.task import ChestXrayTask
from plugins.he import choose_parameters, he_circuit
from storage.db import Database

task = ChestXrayTask()
torch.manual_seed(0)
params = choose_parameters(he_circuit(task, task.build_model()), (-1.0, 1.0))
store = KeyStore(Database(sys.argv[1]), NodeKeys.from_master(bytes(32)).he, timedelta(days=30))
key_id, secret = store.current(task.name, params)
public, galois = secret.public_bundle([1, 2])
served = ts.context_from(public)
assert not served.is_private() and served.has_relin_keys() and len(galois) > 1000
print(key_id)
"""


def test_a_key_loaded_after_a_restart_builds_its_public_context(tmp_path: Path) -> None:
    """A node restarted with its key in the store (or a worker process other than the one
    that made it) must still register it with a service that does not know it: TenSEAL's
    ``copy()`` of a context read back from its secret form died in a segfault. Each run is a
    process of its own, as a restarted node is."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'node.db'}"
    db = Database(url)
    db.upgrade()
    db.dispose()
    runs = [subprocess.run([sys.executable, "-c", _RESTARTED_NODE, url], capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    made, loaded = (run.stdout.strip() for run in runs)
    assert made and loaded == made  # the second process loaded the first one's key
