"""Run a real ``fednode`` node as a subprocess for integration and acceptance tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from node.config import load_settings
from node.keys import NodeKeys, load_master_secret

DCMTK = Path("/usr/bin")
"""DCMTK's tools: pynetdicom installs console scripts of the same names (storescu, storescp,
echoscu) earlier on PATH, so tests call DCMTK by absolute path."""


DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
"""The environment for DCMTK tools: Debian's DCMTK 3.6.7 leaves Nagle's algorithm on unless
``TCP_NODELAY=1`` is set, and then stalls on delayed ACKs (≈ 20 instances/s)."""


def dcmtk(tool: str) -> str:
    path = DCMTK / tool
    if not path.exists():
        raise RuntimeError(f"DCMTK {tool} is missing: apt-get install dcmtk")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fednode_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "node.cli", *args]


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {}), "COLUMNS": "200"}
    proc = subprocess.run(
        fednode_cmd(*args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fednode {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@dataclass
class NodeDir:
    """An initialised node: fednode.toml + master secret + migrated SQLite."""

    root: Path
    port: int
    ae_title: str = "FEDNODE"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.root / "fednode.toml"

    def settings(self):  # type: ignore[no-untyped-def]
        return load_settings(self.config)

    def keys(self) -> NodeKeys:
        return NodeKeys.from_master(load_master_secret(self.settings().secret_path))

    def env(self) -> dict[str, str]:
        return {"FEDNODE_LOGGING__LEVEL": "INFO", **self.extra_env}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "-c", str(self.config), env=self.env(), check=check)


def init_node(
    root: Path,
    *,
    peers: tuple[str, ...] = ("STORESCU@127.0.0.1", "ECHOSCU"),
    port: int | None = None,
    extra_toml: str = "",
) -> NodeDir:
    port = port or free_port()
    args = ["init", "--dir", str(root), "--port", str(port)]
    for p in peers:
        args += ["--peer", p]
    run_cli(*args)
    if extra_toml:
        with open(root / "fednode.toml", "a") as fh:
            fh.write("\n" + extra_toml)
    return NodeDir(root, port)


class RunningNode:
    """``fednode serve`` in its own process group; stop() sends SIGTERM, kill() SIGKILL."""

    def __init__(
        self,
        node: NodeDir,
        *,
        workers: int = 0,
        processes: int = 2,
        env: dict[str, str] | None = None,
    ) -> None:
        self.node = node
        self.log = node.root / f"serve-{time.time_ns()}.log"
        full_env = {**os.environ, **node.env(), **(env or {})}
        full_env["FEDNODE_DICOM__HOST"] = "127.0.0.1"
        self._logfh = open(self.log, "w")
        self.proc = subprocess.Popen(
            fednode_cmd(
                "serve",
                "-c",
                str(node.config),
                "--workers",
                str(workers),
                "--processes",
                str(processes),
            ),
            stdout=self._logfh,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"fednode serve exited {self.proc.returncode}:\n" + self.log.read_text()
                )
            # The supervisor logs this after the socket listens. (No TCP probe: a connection
            # that never sends an A-ASSOCIATE-RQ holds an association slot for acse_timeout.)
            if "listening on" in self.log.read_text():
                return
            time.sleep(0.1)
        raise AssertionError("fednode serve did not become ready:\n" + self.log.read_text())

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._logfh.close()
        # Every child must have obeyed the SIGTERM; the supervisor kills stragglers after the
        # grace period and says so.
        log = self.log.read_text()
        if "did not stop in time" in log:
            raise AssertionError("a child of fednode serve ignored SIGTERM:\n" + log)
        return code

    def kill(self) -> None:
        """SIGKILL the supervisor only: its children must die with it (PR_SET_PDEATHSIG)."""
        self.proc.kill()
        self.proc.wait(10)
        self._logfh.close()

    def __enter__(self) -> RunningNode:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if not self._logfh.closed:
            self._logfh.close()
