"""The HE circuit of a model, its CKKS parameters and layout, the sealed key store, the wire."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from node.inference import wire
from node.inference.errors import WireError
from node.inference.keystore import KeyStore, KeyStoreError
from node.keys import NodeKeys
from plugins.base import PluginLoadError, check_plugin
from plugins.chest_xray.model import ChestXrayNet, Square
from plugins.chest_xray.task import ChestXrayTask
from plugins.he import MAX_MODULUS_BITS, choose_parameters, he_circuit, layout_for
from storage.db import Database


class ReluNet(ChestXrayNet):
    def __init__(self) -> None:
        super().__init__()
        self.act1 = nn.ReLU()  # type: ignore[assignment]


class DeepNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 8, 8)
        self.act1 = Square()
        self.fc1 = nn.Linear(256, 32)
        self.act2 = Square()
        self.fc2 = nn.Linear(32, 16)
        self.act3 = Square()
        self.fc3 = nn.Linear(16, 1)


class SneakyNet(ChestXrayNet):
    """The right layers, but a forward that does something else (a ReLU in disguise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.relu(x))


class Task(ChestXrayTask):
    def __init__(self, model: type[nn.Module]) -> None:
        self._model = model

    def build_model(self) -> nn.Module:
        return self._model()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (ReluNet, "layer 'act1' (ReLU) cannot run under CKKS"),
        (DeepNet, "are not conv -> square -> linear -> square -> linear"),
        (SneakyNet, "forward does not compute"),
    ],
)
def test_check_plugin_refuses_models_the_he_evaluator_cannot_run(
    model: type[nn.Module], message: str
) -> None:
    task = Task(model)
    check_plugin(task)  # without a model: the description alone is fine
    with pytest.raises(PluginLoadError, match=re.escape(message)):
        check_plugin(task, model=task.build_model())


def test_the_circuit_is_the_model_and_its_bound_holds() -> None:
    task = ChestXrayTask()
    torch.manual_seed(3)
    model = task.build_model()
    check_plugin(task, model=model)
    circuit = he_circuit(task, model)
    x = torch.rand(5, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = model(x).reshape(-1).double().numpy()
    assert np.allclose(circuit.logits(x.numpy()), expected, atol=1e-5)
    bound = circuit.logit_bound((-1.0, 1.0))
    extremes = np.sign(np.random.default_rng(0).standard_normal((20, 1, 64, 64)))
    assert np.abs(circuit.logits(extremes)).max() <= bound


def test_parameters_leave_headroom_for_the_bound_and_respect_security() -> None:
    task = ChestXrayTask()
    torch.manual_seed(0)
    model = task.build_model()
    small = choose_parameters(he_circuit(task, model), (-1.0, 1.0))
    with torch.no_grad():
        model.fc2.weight.mul_(1000.0)  # a model with a 1000x larger logit range
    large = choose_parameters(he_circuit(task, model), (-1.0, 1.0))
    for p in (small, large):
        assert p.headroom > p.logit_bound  # decoding cannot wrap for any valid input
        assert sum(p.coeff_mod_bit_sizes) <= MAX_MODULUS_BITS[p.poly_modulus_degree]
        assert p.scale_bits >= 30
    assert large.coeff_mod_bit_sizes[0] - large.scale_bits >= (
        small.coeff_mod_bit_sizes[0] - small.scale_bits + 9
    )


def test_layout_puts_every_convolution_product_in_one_slot() -> None:
    task = ChestXrayTask()
    torch.manual_seed(1)
    circuit = he_circuit(task, task.build_model())
    lay = layout_for(circuit, choose_parameters(circuit, (-1.0, 1.0)))
    image = np.random.default_rng(2).uniform(-1, 1, (64, 64))
    cols = circuit.im2col(image)
    products = sum(
        v * w for v, w in zip(lay.encode_input(cols), lay.conv_plaintexts(circuit), strict=True)
    )
    # rotate-and-sum over the groups == summing the T slot groups of period P
    conv = products.reshape(lay.groups, lay.period).sum(axis=0)
    expected = (circuit.conv_weight @ cols.T).reshape(-1)
    assert np.allclose(conv[: expected.size], expected)
    assert lay.copies == 4 and len(lay.rotation_steps()) == 20


def test_keys_are_sealed_rotated_and_kept_by_id(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.upgrade()
    task = ChestXrayTask()
    torch.manual_seed(0)
    params = choose_parameters(he_circuit(task, task.build_model()), (-1.0, 1.0))
    keys = NodeKeys.from_master(b"\x01" * 32)
    store = KeyStore(db, keys.he, timedelta(days=30))
    now = datetime(2026, 12, 1, tzinfo=UTC)
    first, secret = store.current("chest_xray", params, now=now)
    assert store.current("chest_xray", params, now=now + timedelta(days=29))[0] == first
    second, _ = store.current("chest_xray", params, now=now + timedelta(days=31))
    assert second != first
    # the retired key still decrypts what was encrypted under it, from a fresh process' view
    ct = secret.encrypt_vectors([np.full(params.slots, 0.25)])[0]
    reopened = KeyStore(db, keys.he, timedelta(days=30))
    assert np.allclose(reopened.get(first, params).decrypt_vector(ct)[:8], 0.25, atol=1e-6)
    # sealed under the master secret: another node's secret cannot open it
    other = KeyStore(db, NodeKeys.from_master(b"\x02" * 32).he, timedelta(days=30))
    with pytest.raises(KeyStoreError, match="failed authentication"):
        other.get(first, params)
    db.dispose()


def test_wire_messages_round_trip_and_reject_garbage() -> None:
    msg = wire.pack({"key_id": "k", "images": 2}, [b"a", b"", b"ccc"])
    assert wire.unpack(msg) == ({"images": 2, "key_id": "k"}, [b"a", b"", b"ccc"])
    for bad in (b"", b"FNHE1", msg[:-1], msg + b"x", b"XXXXX" + msg[5:]):
        with pytest.raises(WireError):
            wire.unpack(bad)
    with pytest.raises(WireError, match="too many parts"):
        wire.unpack(msg, max_parts=2)
