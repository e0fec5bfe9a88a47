"""Receive benchmark: fednode's durable C-STORE path against DCMTK and pynetdicom SCPs.

One command (from the repository root, with fednode installed and Debian's ``dcmtk``)::

    python tests/benchmarks/bench_receive.py

It generates (once, cached under ``--corpus``, default ``/tmp/fednode-bench-corpus``) three
corpora with ``tests/support/dicomgen.py``:

- ``ct``   200 CT instances, 512x512, 16-bit (≈ 0.5 MB each);
- ``dx``   20 DX instances, 2048x2048, 16-bit (≈ 8 MB each);
- ``tiny`` 1000 CT instances, 64x64, 16-bit (≈ 9 KB each);

and sends each with DCMTK ``/usr/bin/storescu`` over loopback, with 1 association (one
storescu sending the whole corpus) and with 4 parallel associations (4 storescu processes,
each sending a quarter), to, in the same run:

- ``fednode``: ``fednode serve`` as a subprocess on a freshly ``fednode init``-ed data dir,
  with the node's defaults (SQLite, ``dicom.processes`` = one SCP process per core,
  ``dicom.max_pdu`` 1 MiB) except ``workers.count = 0``, so that de-identification does not
  compete for the cores: the full durable path (structure check, free-space check, AES-GCM
  into the spool with fsync, one SQLite transaction with the instance row and its job,
  then 0x0000). After every run the benchmark checks that every instance is in the
  ``instances`` table with exactly one ``deidentify`` job, and its file in the spool;
- ``fednode-init``: the node as ``fednode init`` configures it, workers on (``serve`` without
  ``--workers``: lanes ``ingest`` 2 and ``results`` 1, workers at ``workers.nice`` 10). Besides
  the receive rate the benchmark measures its end-to-end time: seconds from the first
  ``storescu`` start to the last instance de-identified (the newest ``updated_at`` of the
  ``instances`` rows once every one is ``deidentified`` and has its ``deid_instances`` row),
  printed with its ratio to the no-worker row's reception time (``e2e/rx0``);
- ``fednode-init-pg`` (opt-in): the same on PostgreSQL (``$FEDNODE_BENCH_PG``, default
  ``postgresql://postgres@127.0.0.1:5432/test``), a fresh schema per run (dropped after it),
  migrated with ``fednode db upgrade``;
- ``fednode+workers`` (only with ``--with-workers``): ``serve --workers N`` (default 2: N
  processes in every lane);
- ``orthanc`` (opt-in): Debian's Orthanc (``apt-get install orthanc``) with its defaults but for
  ports and folders (SQLite index, ``SyncStorageArea`` true: each file synced);
- ``dcmtk``: DCMTK ``/usr/bin/storescp --fork`` writing files to a temporary folder (default
  options otherwise: 16 KiB max PDU, no fsync: not durable);
- ``pynetdicom``: pynetdicom's bundled app, ``python -m pynetdicom storescp PORT -od DIR``
  (default options: 16382-byte max PDU, one process, no fsync).

DCMTK tools run with ``TCP_NODELAY=1`` in their environment: Debian's DCMTK 3.6.7 otherwise
leaves Nagle's algorithm on and both ``storescu`` and ``storescp`` stall on delayed ACKs
(≈ 22 CT instances/s whatever the receiver). fednode and pynetdicom set TCP_NODELAY
themselves (fednode on every accepted socket). They are called by full path: pynetdicom
installs console scripts named ``storescu``/``storescp`` that shadow DCMTK's on PATH.

It prints instances/s and MB/s (MB = 10^6 bytes of Part 10 files sent) for each peer x
corpus x associations (median of ``--repeat`` runs, wall clock from the first storescu
start to the last storescu exit) and fednode's ratio to each other peer. The runs of one
cell go round-robin over the peers, and before each run the benchmark waits (up to
``--wait-quiet`` s) for other processes to leave the CPU, so that a busy spell of a shared
machine hits every peer alike. Whole run: about 3 minutes with the defaults on 2 cores.

The 1-minute load average before each run is printed beside it and in the table (the
machine is shared: compare rows of one run only).

Options (``--help``): ``--repeat N`` (default 3), ``--corpora ct,dx,tiny``,
``--assocs 1,4``, ``--peers fednode,fednode-init,dcmtk,pynetdicom`` (also
``fednode-init-pg``, ``orthanc``), ``--with-workers``, ``--corpus DIR``,
``--fednode-env KEY=VALUE`` (extra ``FEDNODE_*`` settings for the node, repeatable, e.g.
``FEDNODE_DICOM__PROCESSES=1``), ``--baseline SRC`` (rows for the fednode of another source
tree, e.g. ``git archive <commit> | tar -x -C SRC``, for before/after figures in one run;
repeatable), ``--wait-quiet SECONDS``, ``--keep`` (keep the run folders), ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from storage.spool import Spool  # noqa: E402  (after the path set-up above)

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
CALLING_AE = "STORESCU"
CALLED_AE = "FEDNODE"
QUARTERS = 4
# Debian's DCMTK 3.6.7 leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment;
# with it off both ends stall on delayed ACKs (~22 CT instances/s instead of ~700).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

CORPORA: dict[str, tuple[str, int, int]] = {
    # name: (kind, count, size)
    "ct": ("ct", 200, 512),
    "dx": ("dx", 20, 2048),
    "tiny": ("ct", 1000, 64),
}
CORPUS_VERSION = 1
PG_ADMIN = os.environ.get("FEDNODE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
E2E_TIMEOUT = 600.0


# -- corpus ---------------------------------------------------------------------------------
def ensure_corpus(root: Path, name: str) -> tuple[Path, int, int]:
    """Generate corpus *name* under *root* unless cached; return (folder, count, bytes)."""
    import numpy as np
    from pydicom.uid import generate_uid

    from tests.support.dicomgen import FakeStudy, ct_instance, dx_instance, write

    kind, count, size = CORPORA[name]
    folder = root / name
    marker = root / f"{name}.complete"
    stamp = f"{CORPUS_VERSION} {kind} {count} {size}"
    if not (marker.exists() and marker.read_text() == stamp):
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating corpus {name}: {count} x {kind} {size}x{size} ...", flush=True)
        study = FakeStudy()
        series_uid = generate_uid()
        rng = np.random.default_rng(20260311)
        for i in range(count):
            if kind == "dx":
                ds = dx_instance(study, series_uid, i, size=size, rng=rng)
            else:
                ds = ct_instance(study, series_uid, 1, i, size=size, rng=rng)
            # round-robin into quarters: 4 associations each send one quarter
            write(ds, folder / f"q{i % QUARTERS}" / f"{i:05d}.dcm")
        marker.write_text(stamp)
    files = sorted(folder.glob("q*/*.dcm"))
    return folder, len(files), sum(f.stat().st_size for f in files)


# -- peers ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_echo(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the SCP exited with code {proc.returncode} before listening")
        rc = subprocess.run(
            [ECHOSCU, "-aet", CALLING_AE, "-aec", CALLED_AE, "-to", "2", "127.0.0.1", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ).returncode
        if rc == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("the SCP did not answer C-ECHO in time")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class Peer:
    """A receiver started fresh for one measurement."""

    key: str
    label: str
    start: Callable[[Path, int], subprocess.Popen[bytes]]
    verify: Callable[[Path, int], str | None]  # returns an error text, or None
    # With workers: wait until every instance is de-identified; return the wall-clock time
    # (time.time()) of the last de-identification.
    finish: Callable[[Path, int], float] | None = None
    cleanup: Callable[[Path], None] | None = None


def _popen(cmd: list[str], run_dir: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    log = open(run_dir / "scp.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd or run_dir, start_new_session=True)


class _NodeDb:
    """Reads the benchmark node's database: its SQLite file, or its PostgreSQL schema."""

    def __init__(self, run_dir: Path, schema: str | None) -> None:
        self.run_dir, self.schema = run_dir, schema

    def query(self, sql: str) -> list[tuple[object, ...]]:
        if self.schema is None:
            db = self.run_dir / "fednode-data" / "fednode.db"
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return list(con.execute(sql).fetchall())
            finally:
                con.close()
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True,
                             options=f"-csearch_path={self.schema}") as con:
            return list(con.execute(sql).fetchall())  # type: ignore[arg-type]


def _as_epoch(value: object) -> float:
    if isinstance(value, datetime):
        stamp = value
    else:  # SQLite keeps UTC timestamps as naive ISO text
        stamp = datetime.fromisoformat(str(value))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def fednode_peer(workers: int | None, extra_env: dict[str, str], src: Path | None = None,
                 *, postgres: bool = False) -> Peer:
    """``fednode serve``; *workers* None = as ``fednode init`` configures it (no --workers:
    the lanes of the config, ingest 2 + results 1), a number = ``--workers N`` (every lane);
    with *postgres*, on a fresh schema of the PostgreSQL database; with *src*, the node of
    that source tree (for before/after rows)."""
    base = [sys.executable, "-m", "node.cli"] if src else ["fednode"]
    schemas: dict[Path, str] = {}

    def db_of(run_dir: Path) -> _NodeDb:
        return _NodeDb(run_dir, schemas.get(run_dir))

    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if src:
            env["PYTHONPATH"] = str(src)
        subprocess.run(
            [*base, "init", "--dir", str(run_dir), "--ae-title", CALLED_AE,
             "--peer", f"{CALLING_AE}@127.0.0.1", "--port", str(port)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            cwd=run_dir,  # `python -m` puts the cwd first on sys.path: not this checkout
        )
        env.update({"FEDNODE_DICOM__HOST": "127.0.0.1", "FEDNODE_LOGGING__LEVEL": "WARNING"})
        if postgres:
            import psycopg

            schema = f"fednode_bench_{secrets.token_hex(6)}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as con:
                con.execute(f'CREATE SCHEMA "{schema}"')
            schemas[run_dir] = schema
            url = PG_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1)
            env["FEDNODE_DATABASE__URL"] = f"{url}?options=-csearch_path%3D{schema}"
            subprocess.run([*base, "db", "upgrade", "-c", str(run_dir / "fednode.toml")],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env)
        env.update(extra_env)
        flags = [] if workers is None else ["--workers", str(workers)]
        return _popen([*base, "serve", "-c", str(run_dir / "fednode.toml"), *flags],
                      run_dir, env)

    def verify(run_dir: Path, expected: int) -> str | None:
        db = db_of(run_dir)
        [(instances,)] = db.query("SELECT count(*) FROM instances")
        [(jobs,)] = db.query("SELECT count(*) FROM jobs WHERE kind = 'deidentify'")
        names = [str(r[0]) for r in
                 db.query("SELECT spool_name FROM instances WHERE state = 'received'")]
        spool_dir = run_dir / "fednode-data" / "spool"
        spool = Spool(spool_dir, bytes(32))  # reads record headers only: no key needed
        # With workers running, de-identified instances have left the spool (and state).
        # A baseline build (--baseline) may still keep one file per item.
        missing = [
            n for n in names
            if not (spool.exists(n) if "@" in n else (spool_dir / n).exists())
        ]
        if missing:  # a worker may have de-identified them (and freed the record) meanwhile
            still = {str(r[0]) for r in
                     db.query("SELECT spool_name FROM instances WHERE state = 'received'")}
            missing = [n for n in missing if n in still]
        if instances != expected or jobs != expected or missing:
            return (f"fednode kept {instances} instances, {jobs} deidentify jobs, "
                    f"{len(missing)} spool records missing; expected {expected}")
        return None

    def finish(run_dir: Path, expected: int) -> float:
        db = db_of(run_dir)
        deadline = time.monotonic() + E2E_TIMEOUT
        while True:
            [(done, last)] = db.query(
                "SELECT count(*), max(updated_at) FROM instances WHERE state = 'deidentified'")
            if int(str(done)) >= expected:
                [(deid,)] = db.query("SELECT count(*) FROM deid_instances")
                if int(str(deid)) != expected:
                    raise RuntimeError(f"{deid} de-identified instances, expected {expected}")
                return _as_epoch(last)
            [(bad,)] = db.query(
                "SELECT count(*) FROM instances WHERE state IN ('failed', 'rejected')")
            if int(str(bad)) or time.monotonic() > deadline:
                raise RuntimeError(f"only {done}/{expected} instances de-identified "
                                   f"({bad} failed or rejected; run folder {run_dir})")
            time.sleep(0.05)

    def cleanup(run_dir: Path) -> None:
        schema = schemas.pop(run_dir, None)
        if schema is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN, autocommit=True) as con:
                con.execute(f'DROP SCHEMA "{schema}" CASCADE')

    if workers is None:
        key, label = "fednode-init", "fednode as initialised"
    elif workers == 0:
        key, label = "fednode", "fednode (workers=0)"
    else:
        key, label = "fednode+workers", f"fednode (--workers {workers})"
    if postgres:
        key, label = f"{key}-pg", f"{label}, PostgreSQL"
    if src:
        key, label = f"{key}@{src.name}", f"{label} ({src.name})"
    return Peer(key, label, start, verify, finish if workers != 0 else None, cleanup)


def _count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def dcmtk_peer() -> Peer:
    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        out = run_dir / "out"
        out.mkdir()
        return _popen([STORESCP, "--fork", "-aet", CALLED_AE, "-od", str(out), str(port)],
                      run_dir, DCMTK_ENV)

    def verify(run_dir: Path, expected: int) -> str | None:
        n = _count_files(run_dir / "out")
        return None if n == expected else f"DCMTK storescp wrote {n} files, expected {expected}"

    return Peer("dcmtk", "DCMTK storescp --fork", start, verify)


ORTHANC = "/usr/sbin/Orthanc"


def orthanc_peer() -> Peer:
    """Orthanc (Debian's ``orthanc`` package) with its defaults but for the ports and folders:
    SQLite index, files in its storage area, synced (``SyncStorageArea`` true)."""
    http_ports: dict[Path, int] = {}

    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        http_ports[run_dir] = free_port()
        config = {
            "Name": "bench", "DicomAet": CALLED_AE, "DicomPort": port,
            "HttpPort": http_ports[run_dir], "RemoteAccessAllowed": False,
            "StorageDirectory": str(run_dir / "storage"),
            "IndexDirectory": str(run_dir / "index"), "SyncStorageArea": True,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "Plugins": [],
        }
        (run_dir / "orthanc.json").write_text(json.dumps(config))
        return _popen([ORTHANC, str(run_dir / "orthanc.json")], run_dir, DCMTK_ENV)

    def verify(run_dir: Path, expected: int) -> str | None:
        import urllib.request

        url = f"http://127.0.0.1:{http_ports[run_dir]}/statistics"
        with urllib.request.urlopen(url, timeout=30) as response:
            n = int(json.load(response)["CountInstances"])
        return None if n == expected else f"Orthanc kept {n} instances, expected {expected}"

    return Peer("orthanc", "Orthanc (SyncStorageArea)", start, verify)


def pynetdicom_peer() -> Peer:
    def start(run_dir: Path, port: int) -> subprocess.Popen[bytes]:
        out = run_dir / "out"
        out.mkdir()
        return _popen([sys.executable, "-m", "pynetdicom", "storescp", str(port),
                       "-aet", CALLED_AE, "-od", str(out), "-ba", "127.0.0.1"], run_dir)

    def verify(run_dir: Path, expected: int) -> str | None:
        n = _count_files(run_dir / "out")
        if n != expected:
            return f"pynetdicom storescp wrote {n} files, expected {expected}"
        return None

    return Peer("pynetdicom", "pynetdicom storescp app", start, verify)


def _cpu_busy(interval: float = 0.5) -> float:
    """Fraction of the machine's CPU time that was busy over *interval* seconds."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit: float, threshold: float = 0.2) -> None:
    """On a shared machine, wait (up to *limit* s) until other work has let go of the CPU."""
    deadline = time.monotonic() + limit
    busy = _cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = _cpu_busy()
    if busy > threshold:
        print(f"  (machine still {busy:.0%} busy with other work)", flush=True)


# -- one measurement ------------------------------------------------------------------------
def send(folder: Path, port: int, assocs: int, run_dir: Path) -> tuple[float, float]:
    """Send the corpus in *folder* with *assocs* storescu processes; return (the wall-clock
    time the first storescu was started, seconds until the last one exited)."""
    if assocs == 1:
        groups = [[folder]]
    else:
        quarters = sorted(p for p in folder.iterdir() if p.is_dir())
        groups = [quarters[i::assocs] for i in range(assocs)]
    procs = []
    wall0 = time.time()
    t0 = time.perf_counter()
    for i, group in enumerate(groups):
        log = open(run_dir / f"storescu-{i}.log", "wb")
        procs.append((subprocess.Popen(
            [STORESCU, "-aet", CALLING_AE, "-aec", CALLED_AE, "+sd", "+r", "+sp", "*.dcm",
             "127.0.0.1", str(port), *map(str, group)],
            stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    elapsed = time.perf_counter() - t0
    failed = [p.returncode for p, _ in procs if p.returncode]
    if failed:
        raise RuntimeError(f"storescu exited with {failed}; see {run_dir}/storescu-*.log")
    return wall0, elapsed


@dataclass
class Result:
    peer: str
    label: str
    corpus: str
    assocs: int
    count: int
    nbytes: int
    seconds: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    """Seconds from the first storescu start to the last instance de-identified."""
    load: list[float] = field(default_factory=list)
    """The 1-minute load average before each run."""

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def e2e_median(self) -> float | None:
        return statistics.median(self.e2e) if self.e2e else None

    @property
    def rate(self) -> float:
        return self.count / self.median

    @property
    def mbps(self) -> float:
        return self.nbytes / self.median / 1e6


def measure_once(peer: Peer, folder: Path, count: int, assocs: int, work: Path,
                 keep: bool, tag: str) -> tuple[float, float | None]:
    """One run: a fresh receiver, the corpus sent, every instance checked; seconds, and with
    workers the end-to-end seconds (first storescu start to last instance de-identified)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{peer.key}-{tag}-", dir=work))
    port = free_port()
    proc = peer.start(run_dir, port)
    e2e = None
    try:
        wait_echo(port, proc)
        # A PACS sends to a node that is up: let the receiver finish starting (a node's
        # worker processes import and warm up after the SCP answers C-ECHO) before sending.
        wait_quiet(15)
        wall0, seconds = send(folder, port, assocs, run_dir)
        error = peer.verify(run_dir, count)
        if error:
            raise RuntimeError(f"{error} (run folder {run_dir})")
        if peer.finish is not None:
            e2e = peer.finish(run_dir, count) - wall0
    finally:
        stop(proc)
        if peer.cleanup is not None:
            peer.cleanup(run_dir)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return seconds, e2e


# -- report ---------------------------------------------------------------------------------
def _paired(r: Result, ref: Result) -> float:
    """The median of the per-round rate ratios: the rounds ran back to back, so a slow spell
    of a shared machine hits both peers of a round alike (the ratio of the medians can
    pair a fast spell of one with a slow spell of the other)."""
    return statistics.median(b / a for a, b in zip(r.seconds, ref.seconds, strict=True))


def table(results: list[Result], peers: list[Peer]) -> str:
    """Rates, fednode's ratio to the no-worker row and to every other peer (plain and
    paired), and for the rows with workers the end-to-end seconds (first byte sent to last
    instance de-identified) beside the no-worker row's reception time."""
    others = [p for p in peers if not p.key.startswith("fednode")]
    w = max(26, *(len(p.label) for p in peers))
    head = f"{'corpus':<6} {'assoc':>5}  {'peer':<{w}} {'inst/s':>8} {'MB/s':>8}"
    head += f"  {'vs workers=0':>12} {'paired':>7}"
    head += "".join(f"  {'vs ' + p.key:>14} {'paired':>7}" for p in others)
    head += f"  {'e2e s':>7} {'e2e/rx0':>7}  {'load1':>5}"
    lines = [head, "-" * len(head)]
    by = {(r.peer, r.corpus, r.assocs): r for r in results}
    keys = sorted({(r.corpus, r.assocs) for r in results},
                  key=lambda k: (list(CORPORA).index(k[0]), k[1]))
    for corpus, assocs in keys:
        base = by.get(("fednode", corpus, assocs))
        for p in peers:
            r = by.get((p.key, corpus, assocs))
            if r is None:
                continue
            line = f"{corpus:<6} {assocs:>5}  {p.label:<{w}} {r.rate:8.1f} {r.mbps:8.1f}"
            if p.key.startswith("fednode") and base is not None and r is not base:
                line += f"  {r.rate / base.rate:>11.2f}x {_paired(r, base):>6.2f}x"
            else:
                line += f"  {'':>12} {'':>7}"
            for o in others:
                ref = by.get((o.key, corpus, assocs))
                line += (f"  {r.rate / ref.rate:>13.2f}x {_paired(r, ref):>6.2f}x"
                         if ref and p.key.startswith("fednode") else f"  {'':>14} {'':>7}")
            e2e = r.e2e_median
            if e2e is not None:
                ratio = f"{e2e / base.median:>6.2f}x" if base is not None else f"{'':>7}"
                line += f"  {e2e:7.2f} {ratio}"
            else:
                line += f"  {'':>7} {'':>7}"
            line += f"  {statistics.median(r.load):5.1f}" if r.load else ""
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/fednode-bench-corpus"),
                    help="corpus cache folder (default /tmp/fednode-bench-corpus)")
    ap.add_argument("--work", type=Path, default=None, help="folder for run dirs (default tmp)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; median (default 3)")
    ap.add_argument("--corpora", default="ct,dx,tiny")
    ap.add_argument("--assocs", default="1,4")
    ap.add_argument("--peers", default="fednode,fednode-init,dcmtk,pynetdicom",
                    help="rows: fednode (workers=0), fednode-init (as `fednode init` "
                         "configures it: workers on), fednode-init-pg (the same on "
                         "PostgreSQL, $FEDNODE_BENCH_PG, a fresh schema per run), dcmtk, "
                         "pynetdicom, orthanc (Debian's package; "
                         "default: fednode,fednode-init,dcmtk,pynetdicom)")
    ap.add_argument("--with-workers", action="store_true",
                    help="add a fednode row with `serve --workers N` (N in every lane)")
    ap.add_argument("--workers", type=int, default=2, help="N for --with-workers")
    ap.add_argument("--fednode-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra FEDNODE_* environment for fednode serve (repeatable)")
    ap.add_argument("--wait-quiet", type=float, default=15.0, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes' CPU use "
                         "to drop below 20%% (0: don't; default 15)")
    ap.add_argument("--baseline", type=Path, metavar="SRC", action="append", default=[],
                    help="add a row for the fednode of another source tree (e.g. an older "
                         "commit from `git archive`), run with PYTHONPATH=SRC; repeatable")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()

    for tool in (STORESCU, STORESCP, ECHOSCU):
        if not Path(tool).exists():
            print(f"{tool} is missing: install Debian's dcmtk", file=sys.stderr)
            return 2
    extra_env = dict(kv.split("=", 1) for kv in args.fednode_env)
    wanted = args.peers.split(",")
    peers: list[Peer] = []
    if "fednode" in wanted:
        peers.append(fednode_peer(0, extra_env))
        for src in args.baseline:
            peers.append(fednode_peer(0, extra_env, src.resolve()))
    if "fednode-init" in wanted:
        peers.append(fednode_peer(None, extra_env))
        for src in args.baseline:
            peers.append(fednode_peer(None, extra_env, src.resolve()))
    if "fednode" in wanted and args.with_workers:
        peers.append(fednode_peer(args.workers, extra_env))
    if "fednode-init-pg" in wanted:
        peers.append(fednode_peer(None, extra_env, postgres=True))
    if "dcmtk" in wanted:
        peers.append(dcmtk_peer())
    if "pynetdicom" in wanted:
        peers.append(pynetdicom_peer())
    if "orthanc" in wanted:
        if not Path(ORTHANC).exists():
            print(f"{ORTHANC} is missing: apt-get install orthanc", file=sys.stderr)
            return 2
        peers.append(orthanc_peer())

    args.corpus.mkdir(parents=True, exist_ok=True)
    corpora = {c: ensure_corpus(args.corpus, c) for c in args.corpora.split(",")}
    assocs_list = [int(a) for a in args.assocs.split(",")]
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fednode-bench-", dir=args.work))
    results: list[Result] = []
    t0 = time.monotonic()
    try:
        for name, (folder, count, nbytes) in corpora.items():
            for assocs in assocs_list:
                cell = {p.key: Result(p.key, p.label, name, assocs, count, nbytes) for p in peers}
                # Round-robin over the peers, so that a slow spell of a shared machine hits
                # them all alike rather than one peer's every run.
                for r in range(args.repeat):
                    for peer in peers:
                        if args.wait_quiet:
                            wait_quiet(args.wait_quiet)
                        load = os.getloadavg()[0]
                        seconds, e2e = measure_once(peer, folder, count, assocs, work,
                                                    args.keep, f"{name}-{assocs}-{r}")
                        cell[peer.key].seconds.append(seconds)
                        cell[peer.key].load.append(load)
                        if e2e is not None:
                            cell[peer.key].e2e.append(e2e)
                        done = f", end to end {e2e:6.2f} s" if e2e is not None else ""
                        print(f"  {peer.label:<40} {name:<5} {assocs} assoc  run {r + 1}/"
                              f"{args.repeat}: {count / seconds:8.1f} inst/s{done}  "
                              f"(load {load:.1f})", flush=True)
                results.extend(cell.values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"fednode receive benchmark: loopback, DCMTK storescu senders, {os.cpu_count()} CPUs, "
          f"median of {args.repeat}; fednode = durable path (spool fsync + SQLite commit), "
          f"workers=0 unless stated; 'paired' = median of the per-round ratios; e2e = "
          f"first storescu start to last instance de-identified, e2e/rx0 = that over the "
          f"workers=0 row's reception time; load1 = 1-min load average before the runs "
          f"(median); {time.monotonic() - t0:.0f} s")
    if extra_env:
        print(f"fednode settings: {extra_env}")
    for name, (_, count, nbytes) in corpora.items():
        print(f"  {name}: {count} instances, {nbytes / 1e6:.1f} MB")
    print()
    print(table(results, peers))
    if args.json:
        args.json.write_text(json.dumps(
            [{"peer": r.peer, "corpus": r.corpus, "assocs": r.assocs, "count": r.count,
              "bytes": r.nbytes, "seconds": r.seconds, "inst_per_s": r.rate, "mb_per_s": r.mbps,
              "e2e_seconds": r.e2e, "load1": r.load}
             for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
