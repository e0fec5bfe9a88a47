"""``fednode federation join``: start and supervise the node's SuperNode and executor.

Two children, both with Flower's telemetry and update checks off and ``FLWR_HOME`` under the
node's federation folder:

- ``flower-supernode --superlink HOST:PORT --root-certificates <ca.pem>
  --auth-supernode-private-key <node_key> --node-config 'fednode-config="<fednode.toml>"'
  --isolation process --host 127.0.0.1 --port <runtime_port>`` (TLS to the SuperLink,
  SuperNode authentication, runtime dependency installation off: the SuperNode's default,
  and fednode's executor never installs dependencies);
- ``python -m node.federated.executor serve`` (:mod:`node.federated.executor`).

A child that exits is restarted after a delay that doubles up to a ceiling and resets after a
minute of healthy running. SIGTERM/SIGINT stop both children (SIGTERM, then SIGKILL after a
grace period); the children also get SIGKILL if the supervisor itself dies (Linux
``PR_SET_PDEATHSIG``), so the SuperNode stops with the node. Output goes to
``<data_dir>/federation/supernode.log``; ``supervisor.json`` records the pids and restarts for
``fednode federation status``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from node.children import die_with_parent
from node.config import Settings
from node.federated.enrollment import FederationPaths, load_enrollment
from node.federated.env import flower_env
from storage.files import atomic_write

logger = logging.getLogger(__name__)

HEALTHY_SECONDS = 60.0


def supernode_command(settings: Settings) -> list[str]:
    """The ``flower-supernode`` command line of this node."""
    enrollment = load_enrollment(settings)
    paths = FederationPaths.of(settings)
    config = settings.source_file
    if config is None:
        from node.federated.enrollment import FederationError

        raise FederationError("join needs the node's config file (-c fednode.toml)")
    cmd = [
        "flower-supernode",
        "--superlink",
        enrollment.superlink,
        "--root-certificates",
        str(paths.ca_cert),
        "--auth-supernode-private-key",
        str(paths.private_key),
        "--node-config",
        f'fednode-config="{Path(config).resolve()}"',
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.federation.runtime_port),
    ]
    if settings.federation.max_wait_seconds is not None:
        cmd += ["--max-wait-time", str(settings.federation.max_wait_seconds)]
    return cmd


def executor_command(settings: Settings) -> list[str]:
    paths = FederationPaths.of(settings)
    return [
        sys.executable,
        "-m",
        "node.federated.executor",
        "serve",
        "--runtime-api-address",
        f"127.0.0.1:{settings.federation.runtime_port}",
        "--approvals",
        str(paths.approvals),
    ]


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    delay: float = 0.0
    next_start: float = 0.0
    last_exit: int | None = None
    history: list[int] = field(default_factory=list)


class Supervisor:
    """Runs the children until :meth:`stop`."""

    def __init__(self, settings: Settings, *, grace: float = 10.0) -> None:
        self.settings = settings
        self.paths = FederationPaths.of(settings)
        self.grace = grace
        self.stop_event = threading.Event()
        self.children = [
            Child("supernode", supernode_command(settings)),
            Child("executor", executor_command(settings)),
        ]
        env = flower_env(FLWR_HOME=str(self.paths.flwr_home))
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.env = env
        self._log: IO[bytes] | None = None

    def _start(self, child: Child) -> None:
        assert self._log is not None
        child.proc = subprocess.Popen(
            child.cmd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        child.started = time.monotonic()
        logger.info("started %s (pid %d)", child.name, child.proc.pid)

    def _write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "updated_at": time.time(),
            "children": {
                c.name: {
                    "pid": c.proc.pid if c.proc and c.proc.poll() is None else None,
                    "restarts": c.restarts,
                    "last_exit": c.last_exit,
                }
                for c in self.children
            },
        }
        atomic_write(self.paths.supervisor_state, json.dumps(state).encode(), mode=0o600)

    def run(self) -> int:
        """Supervise until stopped; return 0."""
        self.paths.flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = self.settings.federation
        with open(self.paths.log, "ab") as log:
            self._log = log
            for child in self.children:
                self._start(child)
            self._write_state()
            while not self.stop_event.wait(0.5):
                now = time.monotonic()
                changed = False
                for child in self.children:
                    if child.proc is not None and child.proc.poll() is not None:
                        child.last_exit = child.proc.returncode
                        healthy = now - child.started > HEALTHY_SECONDS
                        child.delay = (
                            cfg.restart_delay_seconds
                            if healthy or child.delay == 0
                            else min(child.delay * 2, cfg.restart_delay_max_seconds)
                        )
                        child.next_start = now + child.delay
                        logger.warning(
                            "%s exited with %s; restarting in %.0f s",
                            child.name,
                            child.last_exit,
                            child.delay,
                        )
                        child.proc = None
                        changed = True
                    if child.proc is None and now >= child.next_start:
                        child.restarts += 1
                        self._start(child)
                        changed = True
                if changed:
                    self._write_state()
            self._shutdown()
            self._write_state()
        return 0

    def stop(self) -> None:
        self.stop_event.set()

    def _shutdown(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + self.grace
        for child in self.children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
        logger.info("SuperNode and executor stopped")


def supervisor_state(settings: Settings) -> dict[str, object] | None:
    """The last state the supervisor wrote, if its process is alive."""
    paths = FederationPaths.of(settings)
    try:
        state: dict[str, object] = json.loads(paths.supervisor_state.read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    try:
        os.kill(int(str(pid)), 0)
    except (OSError, TypeError, ValueError):
        return None
    return state
