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
- ``fednode+workers`` (only with ``--with-workers``): the same with ``--workers`` (default 2)
  worker processes running (they lease the ``deidentify`` jobs as they come);
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

Options (``--help``): ``--repeat N`` (default 3), ``--corpora ct,dx,tiny``,
``--assocs 1,4``, ``--peers fednode,dcmtk,pynetdicom``, ``--with-workers``, ``--corpus DIR``,
``--fednode-env KEY=VALUE`` (extra ``FEDNODE_*`` settings for the node, repeatable, e.g.
``FEDNODE_DICOM__PROCESSES=1``), ``--baseline SRC`` (a row for the fednode of another source
tree, e.g. ``git archive <commit> | tar -x -C SRC``, for before/after figures in one run),
``--wait-quiet SECONDS``, ``--keep`` (keep the run folders), ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _popen(cmd: list[str], run_dir: Path, env: dict[str, str] | None = None,
           cwd: Path | None = None) -> subprocess.Popen[bytes]:
    log = open(run_dir / "scp.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=cwd or run_dir, start_new_session=True)


def fednode_peer(workers: int, extra_env: dict[str, str], src: Path | None = None) -> Peer:
    """``fednode serve``; with *src*, the node of that source tree (for before/after rows)."""
    base = [sys.executable, "-m", "node.cli"] if src else ["fednode"]

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
        env.update(extra_env)
        return _popen([*base, "serve", "-c", str(run_dir / "fednode.toml"),
                       "--workers", str(workers)], run_dir, env)

    def verify(run_dir: Path, expected: int) -> str | None:
        db = run_dir / "fednode-data" / "fednode.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            (instances,) = con.execute("SELECT count(*) FROM instances").fetchone()
            (jobs,) = con.execute(
                "SELECT count(*) FROM jobs WHERE kind = 'deidentify'").fetchone()
            names = [r[0] for r in con.execute(
                "SELECT spool_name FROM instances WHERE state = 'received'")]
        finally:
            con.close()
        spool_dir = run_dir / "fednode-data" / "spool"
        spool = Spool(spool_dir, bytes(32))  # reads record headers only: no key needed
        # With workers running, de-identified instances have left the spool (and state).
        # A baseline build (--baseline) may still keep one file per item.
        missing = [
            n for n in names
            if not (spool.exists(n) if "@" in n else (spool_dir / n).exists())
        ]
        if instances != expected or jobs != expected or missing:
            return (f"fednode kept {instances} instances, {jobs} deidentify jobs, "
                    f"{len(missing)} spool records missing; expected {expected}")
        return None

    key = "fednode" if workers == 0 else "fednode+workers"
    label = f"fednode (workers={workers})"
    if src:
        key, label = f"{key}@base", f"{label[:-1]}, {src.name})"
    return Peer(key, label, start, verify)


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
def send(folder: Path, port: int, assocs: int, run_dir: Path) -> float:
    """Send the corpus in *folder* with *assocs* storescu processes; return seconds."""
    if assocs == 1:
        groups = [[folder]]
    else:
        quarters = sorted(p for p in folder.iterdir() if p.is_dir())
        groups = [quarters[i::assocs] for i in range(assocs)]
    procs = []
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
    return elapsed


@dataclass
class Result:
    peer: str
    label: str
    corpus: str
    assocs: int
    count: int
    nbytes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        return self.count / self.median

    @property
    def mbps(self) -> float:
        return self.nbytes / self.median / 1e6


def measure_once(peer: Peer, folder: Path, count: int, assocs: int, work: Path,
                 keep: bool, tag: str) -> float:
    """One run: a fresh receiver, the corpus sent, every instance checked; seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{peer.key}-{tag}-", dir=work))
    port = free_port()
    proc = peer.start(run_dir, port)
    try:
        wait_echo(port, proc)
        seconds = send(folder, port, assocs, run_dir)
        error = peer.verify(run_dir, count)
        if error:
            raise RuntimeError(f"{error} (run folder {run_dir})")
    finally:
        stop(proc)
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return seconds


# -- report ---------------------------------------------------------------------------------
def _paired(r: Result, ref: Result) -> float:
    """The median of the per-round rate ratios: the rounds ran back to back, so a slow spell
    of a shared machine hits both peers of a round alike (the ratio of the medians can
    pair a fast spell of one with a slow spell of the other)."""
    return statistics.median(b / a for a, b in zip(r.seconds, ref.seconds, strict=True))


def table(results: list[Result], peers: list[Peer]) -> str:
    others = [p for p in peers if not p.key.startswith("fednode")]
    w = max(26, *(len(p.label) for p in peers))
    head = f"{'corpus':<6} {'assoc':>5}  {'peer':<{w}} {'inst/s':>8} {'MB/s':>8}"
    head += "".join(f"  {'vs ' + p.key:>14} {'paired':>7}" for p in others)
    lines = [head, "-" * len(head)]
    by = {(r.peer, r.corpus, r.assocs): r for r in results}
    keys = sorted({(r.corpus, r.assocs) for r in results},
                  key=lambda k: (list(CORPORA).index(k[0]), k[1]))
    for corpus, assocs in keys:
        for p in peers:
            r = by.get((p.key, corpus, assocs))
            if r is None:
                continue
            line = f"{corpus:<6} {assocs:>5}  {p.label:<{w}} {r.rate:8.1f} {r.mbps:8.1f}"
            if p.key.startswith("fednode"):
                for o in others:
                    ref = by.get((o.key, corpus, assocs))
                    line += (f"  {r.rate / ref.rate:>13.2f}x {_paired(r, ref):>6.2f}x" if ref
                             else f"  {'':>14} {'':>7}")
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
    ap.add_argument("--peers", default="fednode,dcmtk,pynetdicom")
    ap.add_argument("--with-workers", action="store_true",
                    help="add a fednode row with the default worker processes running")
    ap.add_argument("--workers", type=int, default=2, help="worker count for --with-workers")
    ap.add_argument("--fednode-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra FEDNODE_* environment for fednode serve (repeatable)")
    ap.add_argument("--wait-quiet", type=float, default=15.0, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes' CPU use "
                         "to drop below 20%% (0: don't; default 15)")
    ap.add_argument("--baseline", type=Path, metavar="SRC",
                    help="add a row for the fednode of another source tree (e.g. an older "
                         "commit from `git archive`), run with PYTHONPATH=SRC")
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
        if args.baseline:
            peers.append(fednode_peer(0, extra_env, args.baseline.resolve()))
        if args.with_workers:
            peers.append(fednode_peer(args.workers, extra_env))
    if "dcmtk" in wanted:
        peers.append(dcmtk_peer())
    if "pynetdicom" in wanted:
        peers.append(pynetdicom_peer())

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
                        seconds = measure_once(peer, folder, count, assocs, work, args.keep,
                                               f"{name}-{assocs}-{r}")
                        cell[peer.key].seconds.append(seconds)
                        print(f"  {peer.label:<36} {name:<5} {assocs} assoc  run {r + 1}/"
                              f"{args.repeat}: {count / seconds:8.1f} inst/s", flush=True)
                results.extend(cell.values())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"fednode receive benchmark: loopback, DCMTK storescu senders, {os.cpu_count()} CPUs, "
          f"median of {args.repeat}; fednode = durable path (spool fsync + SQLite commit), "
          f"workers=0 unless stated; 'paired' = median of the per-round ratios; "
          f"{time.monotonic() - t0:.0f} s")
    if extra_env:
        print(f"fednode settings: {extra_env}")
    for name, (_, count, nbytes) in corpora.items():
        print(f"  {name}: {count} instances, {nbytes / 1e6:.1f} MB")
    print()
    print(table(results, peers))
    if args.json:
        args.json.write_text(json.dumps(
            [{"peer": r.peer, "corpus": r.corpus, "assocs": r.assocs, "count": r.count,
              "bytes": r.nbytes, "seconds": r.seconds, "inst_per_s": r.rate, "mb_per_s": r.mbps}
             for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
