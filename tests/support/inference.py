"""Encrypted-inference test helpers: a small trained chest model, the service as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from node.children import die_with_parent
from plugins.base import TaskPlugin
from tests.support.node import fednode_cmd


def synthetic_inputs(
    plugin: TaskPlugin, count: int, *, seed: int, image_size: int = 96
) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed inputs ``(N, 1, 64, 64)`` and targets of generated studies."""
    xs, ys = [], []
    for study in plugin.synthetic_studies(count, seed=seed, image_size=image_size):
        xs.append(plugin.preprocess(list(study.datasets)))
        ys.append(plugin.class_index(study.label))
    return np.stack(xs).astype(np.float32), np.array(ys)


def train_artifact(
    directory: Path, plugin: TaskPlugin, *, count: int = 48, seed: int = 0, epochs: int = 60
) -> Path:
    """Train the task's model briefly on generated studies and save an artifact."""
    import torch

    from node.tasks.training import save_artifact
    from plugins.base import architecture_hash

    inputs, targets = synthetic_inputs(plugin, count, seed=seed)
    torch.manual_seed(seed)
    model = plugin.build_model()
    x = torch.from_numpy(inputs)
    y = torch.from_numpy(targets.astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bound = plugin.he_encoding.output_bound / 2
    for _ in range(epochs):
        opt.zero_grad()
        logits = model(x).reshape(-1)
        loss = loss_fn(logits, y * 0.9 + 0.05) + torch.relu(logits.abs() - bound).pow(2).mean()
        loss.backward()
        opt.step()
    meta = {
        "task": plugin.name,
        "task_version": plugin.version,
        "architecture_hash": architecture_hash(plugin, model),
        "created_at": "2026-12-02T00:00:00+00:00",
        "source": "test",
    }
    path, _ = save_artifact(directory, plugin, model, meta)
    return path


class RunningService:
    """``fednode inference-server`` as a subprocess on loopback (port 0 unless given)."""

    def __init__(
        self, artifact: Path, state_dir: Path, *, port: int = 0, extra: tuple[str, ...] = (),
        verify: str | bool = True,
    ) -> None:
        """*verify*: how the start-up health check verifies a TLS service (a CA bundle)."""
        self.log: list[str] = []
        self._verify = verify
        self.proc = subprocess.Popen(
            fednode_cmd(
                "inference-server",
                "--model",
                str(artifact),
                "--port",
                str(port),
                "--state-dir",
                str(state_dir),
                *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "300"},
            start_new_session=True,
            preexec_fn=die_with_parent,  # a killed test run leaves no service behind
        )
        self.url = self._wait_url()

    def _wait_url(self, timeout: float = 120) -> str:
        found: list[str] = []
        done = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                m = re.search(r"listening on (http\S+)", line)
                if m and not found:
                    found.append(m.group(1))
                    done.set()
            done.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        done.wait(timeout)
        if not found:
            self.stop()
            raise AssertionError("inference-server did not start:\n" + "".join(self.log))
        # The URL is printed just before uvicorn starts serving on the bound socket.
        import httpx

        from node.inference.client import trusted_roots

        verify = trusted_roots(self._verify) if isinstance(self._verify, str) else self._verify
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(found[0] + "/v1/health", timeout=2, verify=verify)
                return found[0]
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("inference-server does not answer:\n" + "".join(self.log))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._pump.join(10)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def __enter__(self) -> RunningService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
