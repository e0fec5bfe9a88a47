"""Federation pieces without a network: the privacy accountant against the exact Gaussian
mechanism, the run config, enrollment keys and approvals."""

from __future__ import annotations

import math
import stat
import subprocess
from pathlib import Path

import pytest

from node.config import NodeSection, Settings
from node.federated.enrollment import (
    FederationError,
    FederationPaths,
    approve,
    enroll,
    is_approved,
    leave,
    load_approvals,
    load_enrollment,
    revoke,
)
from node.federated.privacy import GaussianAccountant


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _exact_epsilon(z: float, rounds: int, delta: float) -> float:
    """Exact epsilon of the composed Gaussian mechanism (Balle & Wang 2018, Thm. 8; T
    compositions with multiplier z are one with mu = sqrt(T) / z)."""
    mu = math.sqrt(rounds) / z

    def d(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("z", "rounds"), [(0.8, 1), (1.0, 5), (2.0, 20), (5.0, 100)])
def test_rdp_epsilon_bounds_the_exact_gaussian_epsilon_tightly(z: float, rounds: int) -> None:
    acc = GaussianAccountant(z, 1e-5)
    eps = acc.step(rounds)
    exact = _exact_epsilon(z, rounds, 1e-5)
    assert exact <= eps <= exact * 1.35, (eps, exact)


def test_accountant_edge_cases() -> None:
    assert GaussianAccountant(1.0, 1e-5).epsilon() == 0.0
    assert GaussianAccountant(0.0, 1e-5).step() == math.inf
    with pytest.raises(ValueError):
        GaussianAccountant(1.0, 0.0)


def test_run_config_is_parsed_and_unknown_keys_refused() -> None:
    from node.federated.server import RunSettings

    s = RunSettings.from_run_config({"num-rounds": 3, "noise-multiplier": 1.1, "secagg": False})
    assert (s.num_rounds, s.noise_multiplier, s.secagg, s.uniform) == (3, 1.1, False, True)
    assert s.round_learning_rate(1) == pytest.approx(s.learning_rate)
    assert s.round_learning_rate(3) == pytest.approx(0.1 * s.learning_rate)
    with pytest.raises(ValueError, match="unknown run config key"):
        RunSettings.from_run_config({"num-round": 3})
    with pytest.raises(ValueError):
        RunSettings.from_run_config({"clipping-norm": 0})


def test_server_momentum_selects_fedavgm_and_is_refused_with_central_dp() -> None:
    from flwr.server.strategy import FedAvg, FedAvgM

    from node.federated.server import RunSettings, build_strategy
    from plugins.base import resolve_task

    plugin = resolve_task("chest_xray")
    plain, _ = build_strategy(RunSettings(), plugin)
    moving, _ = build_strategy(RunSettings.from_run_config({"server-momentum": 0.5}), plugin)
    plain_inner, moving_inner = plain.inner.strategy, moving.inner.strategy  # inside the DP wrapper
    assert type(plain_inner) is FedAvg
    assert isinstance(moving_inner, FedAvgM) and moving_inner.server_momentum == 0.5
    with pytest.raises(ValueError, match="central DP"):
        RunSettings.from_run_config({"server-momentum": 0.5, "noise-multiplier": 1.0})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        RunSettings.from_run_config({"server-momentum": 1.0})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(node=NodeSection(data_dir=tmp_path / "data"))


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    from tests.support.flower import make_tls

    return make_tls(tmp_path / "tls")[0]


def test_enroll_writes_a_p384_openssh_key_pair(settings: Settings, ca: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    record = enroll(settings, "fl.example.org:9092", ca, "site-a")
    paths = FederationPaths.of(settings)
    assert stat.S_IMODE(paths.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.root.stat().st_mode) == 0o700
    key = load_ssh_private_key(paths.private_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert record.public_key.startswith("ecdsa-sha2-nistp384 ")
    keygen = subprocess.run(
        ["ssh-keygen", "-lf", str(paths.public_key)], capture_output=True, text=True, check=True
    )
    assert record.fingerprint in keygen.stdout  # the same fingerprint OpenSSH shows
    assert record.register_command(paths, "fed") == (
        "flwr supernode register node_key.pub fed --name site-a"
    )
    assert load_enrollment(settings) == record
    with pytest.raises(FederationError, match="already enrolled"):
        enroll(settings, "fl.example.org:9092", ca, "site-a")
    removed = leave(settings)
    assert paths.private_key in removed and not paths.private_key.exists()
    with pytest.raises(FederationError, match="not enrolled"):
        load_enrollment(settings)


@pytest.mark.parametrize("address", ["https://fl:9092", "fl", "fl:0", "fl:99999"])
def test_enroll_refuses_a_malformed_address(settings: Settings, ca: Path, address: str) -> None:
    with pytest.raises(FederationError, match="HOST:PORT"):
        enroll(settings, address, ca, None)


def test_enroll_refuses_a_file_that_is_not_a_certificate(
    settings: Settings, tmp_path: Path
) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(FederationError, match="not a readable PEM certificate"):
        enroll(settings, "fl:9092", bogus, None)


def test_approvals_by_file_and_by_hash(settings: Settings, tmp_path: Path) -> None:
    import hashlib

    fab = tmp_path / "app.fab"
    fab.write_bytes(b"bundle bytes")
    digest, source = approve(settings, str(fab))
    assert digest == hashlib.sha256(b"bundle bytes").hexdigest() and source == "app.fab"
    other = "ab" * 32
    approve(settings, other.upper())
    path = FederationPaths.of(settings).approvals
    assert set(load_approvals(path)) == {digest, other}
    assert is_approved(path, digest) and not is_approved(path, "cd" * 32)
    assert revoke(settings, other) and not is_approved(path, other)
    with pytest.raises(FederationError, match="neither a bundle file"):
        approve(settings, "not-a-hash")
    path.write_text("{broken")
    assert not is_approved(path, digest)  # an unreadable file approves nothing


def test_local_dp_mod_adds_noise_of_sigma_times_the_clipping_norm(tmp_path: Path) -> None:
    import numpy as np

    from node.federated.env import quiet_flower

    quiet_flower()
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import (
        Code,
        FitIns,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from node.federated.client import node_local_dp_mod

    config = tmp_path / "fednode.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path}"\n\n[federation]\nlocal_dp_noise_multiplier = 0.5\n'
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    before = [np.zeros(20000, dtype=np.float32)]
    after = [np.full(20000, 0.001, dtype=np.float32)]
    ins = FitIns(ndarrays_to_parameters(before), {"clipping_norm": 2.0})
    msg = Message(compat.fitins_to_recorddict(ins, keep_input=True), 2, MessageType.TRAIN)

    def call_next(m: Message, c: Context) -> Message:
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(after), 10, {})
        return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=m)

    def context(path: Path | None) -> Context:
        cfg = {"fednode-config": str(path)} if path else {}
        return Context(run_id=1, node_id=2, node_config=cfg, state=RecordDict(), run_config={})

    out = node_local_dp_mod(msg, context(config), call_next)
    sent = parameters_to_ndarrays(compat.recorddict_to_fitres(out.content, True).parameters)[0]
    noise = sent - after[0]
    assert abs(float(noise.std()) - 0.5 * 2.0) < 0.05 and abs(float(noise.mean())) < 0.05
    plain = node_local_dp_mod(msg, context(None), call_next)  # no node config: no local DP
    sent = parameters_to_ndarrays(compat.recorddict_to_fitres(plain.content, True).parameters)[0]
    assert np.array_equal(sent, after[0])


def test_registration_is_read_from_the_supernode_log(tmp_path: Path) -> None:
    from node.federated.commands import _registration

    log = tmp_path / "supernode.log"
    assert _registration(log).startswith("unknown")
    log.write_text("INFO :      Starting Flower SuperNode\n")
    assert _registration(log) == "not yet connected"
    log.write_text("Starting\n[code: 2004] Failed to activate SuperNode.\n")
    assert _registration(log).startswith("refused")
    # ids full of digits after a successful activation are not refusals
    log.write_text(
        "[code: 2004] Failed to activate SuperNode.\nINFO :      SuperNode ID: 1820041\n"
        "task 15609803392004014364 of run 5918713209819799071: bundle 794c310fb4af\n"
    )
    assert _registration(log).startswith("registered")
