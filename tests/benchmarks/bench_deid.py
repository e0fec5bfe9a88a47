"""Benchmark: time per instance of fednode's de-identification (PS3.15 Annex E, whole table)
against dicognito, pydicom's ``deid`` (default recipe) and the pydicom read+write floor.

Run, from the repository root (one command):

    python tests/benchmarks/bench_deid.py

It creates ``/tmp/fednode-bench-venv`` with ``pip install dicognito deid`` if that venv is
missing (the competitors never go into the project's environment), writes the corpus once to a
temporary folder, then times each tool in its own process on the same files held in memory:
read the bytes, de-identify, write the bytes. One warm-up pass, then the median of ``--passes``
timed passes. Corpora: ``ct512`` (a synthetic 512x512 CT series from ``tests/support/dicomgen``,
the typical instance), ``mixed`` (pydicom's CT, MR, RT plan/dose, SEG and SR test files).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV = Path("/tmp/fednode-bench-venv")
ROOT = Path(__file__).resolve().parents[2]
MIXED = [
    "CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtdose.dcm", "liver.dcm", "test-SR.dcm",
    "reportsi.dcm", "MR2_UNCI.dcm", "emri_small.dcm", "waveform_ecg.dcm",
]


def build_corpus(folder: Path) -> None:
    """Write the benchmark corpus (run in the project's environment)."""
    sys.path.insert(0, str(ROOT))
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from tests.support import dicomgen

    ct = folder / "ct512"
    ct.mkdir(parents=True)
    study = dicomgen.FakeStudy()
    for s in range(2):
        series_uid = generate_uid()
        for i in range(10):
            ds = dicomgen.ct_instance(study, series_uid, s + 1, s * 10 + i, size=512)
            dicomgen.write(ds, ct / f"{s}_{i}.dcm")
    mixed = folder / "mixed"
    mixed.mkdir()
    for name in MIXED:
        path = get_testdata_file(name)
        if path is not None:
            (mixed / name).write_bytes(Path(path).read_bytes())


def ensure_venv() -> Path:
    """The competitors' venv, created with pip if missing."""
    python = VENV / "bin" / "python"
    probe = [str(python), "-c", "import dicognito, deid"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {VENV} (pip install dicognito deid) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "dicognito", "deid"],
        check=True,
    )
    return python


# --------------------------------------------------------------------------------------------
# Workers (each runs in its own process; only the fednode worker imports fednode)


def _tool(name: str):  # type: ignore[no-untyped-def]
    """A function bytes -> bytes for *name*."""
    import pydicom

    def read(data: bytes) -> pydicom.Dataset:
        return pydicom.dcmread(io.BytesIO(data))

    def write(ds: pydicom.Dataset) -> bytes:
        out = io.BytesIO()
        ds.save_as(out)
        return out.getvalue()

    if name == "floor":
        return lambda data: write(read(data))
    if name == "dicognito":
        from dicognito.anonymizer import Anonymizer

        anonymizer = Anonymizer(seed="fednode-bench")

        def dicognito_run(data: bytes) -> bytes:
            ds = read(data)
            anonymizer.anonymize(ds)
            return write(ds)

        return dicognito_run
    if name == "deid":
        import logging

        from deid.config import DeidRecipe
        from deid.dicom import replace_identifiers
        from deid.logger import bot

        bot.level = 0
        logging.disable(logging.WARNING)
        recipe = DeidRecipe()

        def deid_run(data: bytes) -> bytes:
            ds = replace_identifiers([read(data)], deid=recipe, save=False)[0]
            return write(ds)

        return deid_run
    if name == "fednode":
        sys.path.insert(0, str(ROOT))
        from node.config import DeidSection
        from node.deid.engine import Deidentifier

        engine = Deidentifier(DeidSection(), b"\x01" * 32)

        def fednode_run(data: bytes) -> bytes:
            result = engine.deidentify_file(data)
            if result.residue:
                raise RuntimeError("residue")
            return result.data

        return fednode_run
    raise SystemExit(f"unknown tool {name}")


def worker(name: str, corpus: Path, passes: int) -> dict[str, float]:
    """Median milliseconds per instance of tool *name* on each corpus group."""
    import contextlib
    import warnings

    warnings.simplefilter("ignore")
    run = _tool(name)
    result: dict[str, float] = {}
    for group in sorted(p for p in corpus.iterdir() if p.is_dir()):
        files = [f.read_bytes() for f in sorted(group.iterdir())]
        with contextlib.redirect_stdout(io.StringIO()):
            for data in files:  # warm-up
                run(data)
            times = []
            for _ in range(passes):
                start = time.perf_counter()
                for data in files:
                    run(data)
                times.append((time.perf_counter() - start) / len(files) * 1000)
        result[group.name] = statistics.median(times)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.corpus, args.passes)))
        return
    venv_python = ensure_venv()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp)
        build_corpus(corpus)
        rows: dict[str, dict[str, float]] = {}
        for tool, python in (
            ("floor", sys.executable),
            ("fednode", sys.executable),
            ("dicognito", str(venv_python)),
            ("deid", str(venv_python)),
        ):
            out = subprocess.run(
                [python, __file__, "--worker", tool, "--corpus", str(corpus),
                 "--passes", str(args.passes)],
                check=True, capture_output=True, text=True, cwd=ROOT,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            rows[tool] = json.loads(out.stdout.strip().splitlines()[-1])
    groups = sorted(next(iter(rows.values())))
    header = f"{'tool':<28}" + "".join(f"{g + ' ms/inst':>18}" for g in groups)
    print(header)
    print("-" * len(header))
    labels = {
        "floor": "pydicom read+write (floor)",
        "fednode": "fednode (Annex E, full)",
        "dicognito": "dicognito",
        "deid": "deid (default recipe)",
    }
    for tool, values in rows.items():
        print(f"{labels[tool]:<28}" + "".join(f"{values[g]:>18.2f}" for g in groups))
    for g in groups:
        speed = rows["dicognito"][g] / rows["fednode"][g]
        print(f"fednode is {speed:.1f}x faster than dicognito on {g}")


if __name__ == "__main__":
    main()
