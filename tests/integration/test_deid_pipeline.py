"""The ``deidentify`` job on a real SQLite database, spool and blob store (design: the PHI
boundary): rows, vault, audit, spool deletion, rejection, re-opening, idempotence, determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UltrasoundImageStorage,
    generate_uid,
)
from sqlalchemy import select, text, update

import storage.spool as spool_module
from node.config import DeidSection, NodeSection, PixelRule, Settings, SpoolSection
from node.deid import vault
from node.deid.pseudonyms import token
from node.jobs import PERIODIC, JobContext, JobKind, PermanentJobError, load_handlers, parse_payload
from node.keys import NodeKeys
from node.pipeline.deidentify import (
    deidentify_job,
    remove_orphan_blobs,
    remove_orphan_spool,
    remove_rejected_spool,
)
from storage.db import Database
from storage.errors import DatabaseUnavailable
from storage.models import AuditEvent, DeidInstance, Instance, Series, Study
from storage.queue import SqlQueue
from storage.records import InstanceState, JobState, StudyState
from tests.support import dicomgen
from tests.support.storage import receive_instance
from tests.unit.deid_support import ct, encode, read

MASTER = bytes(range(100, 132))
PHI = ["DOE^JANE", "MRN0012345", "ACC20260001", "Harbour", "HOUSE^GREGORY", "Example General",
       "TECH^TERRY", "19640213", "20260311"]


def make_ctx(root: Path, master: bytes = MASTER, *, url: str | None = None,
             **deid: object) -> JobContext:
    db = Database(url or f"sqlite:///{root}/t.db")
    db.upgrade()
    settings = Settings(
        node=NodeSection(data_dir=root),
        deid=DeidSection(**deid),  # type: ignore[arg-type]
        spool=SpoolSection(reject_retention_hours=72),
    )
    return JobContext(settings=settings, db=db, queue=SqlQueue(db),
                      keys=NodeKeys.from_master(master))


def receive(ctx: JobContext, ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> int:
    """What the SCP leaves behind (issue 2's contract): spool item, instance row, job."""
    return receive_instance(ctx, ds, syntax)


def run_one(ctx: JobContext) -> None:
    job = ctx.queue.lease("test", [JobKind.DEIDENTIFY], 60)
    assert job is not None
    try:
        deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    except Exception as exc:
        ctx.queue.fail(job, str(exc), retry_in=None)
        raise
    assert ctx.queue.complete(job)


def instance(ctx: JobContext, instance_id: int) -> Instance:
    with ctx.db.session() as s:
        row = s.get(Instance, instance_id)
        assert row is not None
        return row


def test_handler_is_registered() -> None:
    assert JobKind.DEIDENTIFY in load_handlers()
    assert "deid-sweep-rejected" in PERIODIC


def test_deidentify_job_end_to_end(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    ds = ct()
    instance_id = receive(ctx, ds)
    spool_name = instance(ctx, instance_id).spool_name
    run_one(ctx)

    row = instance(ctx, instance_id)
    assert row.state == InstanceState.DEIDENTIFIED.value and row.blob_ref
    assert spool_name is not None and not ctx.spool.exists(spool_name)
    data = ctx.blobs.get(row.blob_ref)
    out = read(data)
    assert out.SOPInstanceUID == row.sop_key  # keyed pseudonym, the SCP's key
    assert out.PatientIdentityRemoved == "YES"
    with ctx.db.session() as s:
        study = s.get(Study, row.study_key)
        series = s.get(Series, row.series_key)
        deid = s.get(DeidInstance, row.sop_key)
        events = [e.event for e in s.execute(select(AuditEvent)).scalars()]
        assert study is not None and series is not None and deid is not None
        assert (study.state, study.version) == (StudyState.RECEIVING.value, 1)
        assert study.patient_key == token(ctx.keys.site, "patient-id", "MRN0012345")
        assert study.accession_key == token(ctx.keys.site, "accession", "ACC20260001")
        assert study.last_received_at is not None
        assert (series.modality, series.study_key) == ("CT", row.study_key)
        assert (deid.blob_ref, deid.size_bytes) == (row.blob_ref, len(data))
    assert "deidentified" in events

    original = vault.load_study(ctx.db, ctx.keys, row.study_key)
    assert original is not None
    assert str(original.PatientName) == "DOE^JANE^Q" and original.PatientID == "MRN0012345"
    assert original.StudyInstanceUID == ds.StudyInstanceUID
    assert original.AccessionNumber == "ACC20260001"
    uids = vault.load_instances(ctx.db, ctx.keys, row.study_key)
    assert set(uids) == {row.sop_key}
    assert uids[row.sop_key].SOPInstanceUID == ds.SOPInstanceUID
    assert uids[row.sop_key].SeriesInstanceUID == ds.SeriesInstanceUID
    assert uids[row.sop_key].SOPClassUID == ds.SOPClassUID

    # the PHI boundary: nothing identifying anywhere in the database in clear
    dump = _dump(ctx.db)
    for phi in [*PHI, ds.SOPInstanceUID, ds.StudyInstanceUID]:
        assert phi.encode() not in dump, phi
    for phi in PHI:
        assert phi.encode() not in data


def _dump(db: Database) -> bytes:
    chunks = []
    with db.engine.connect() as conn:
        for (table,) in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")):
            for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                chunks.append(repr(tuple(row)).encode())
    return b"\n".join(chunks)


def test_vault_is_encrypted_and_bound_to_its_key(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    instance_id = receive(ctx, ct())
    run_one(ctx)
    row = instance(ctx, instance_id)
    with ctx.db.session() as s:
        blob = s.execute(text("SELECT ciphertext FROM vault_studies")).scalar_one()
    assert b"DOE" not in blob
    with pytest.raises(vault.VaultError):
        vault.unseal(ctx.keys.vault, "2.25.1", blob)  # another study's key
    other = NodeKeys.from_master(bytes(32))
    with pytest.raises(vault.VaultError):
        vault.load_study(ctx.db, other, row.study_key)


def test_rerun_is_idempotent_and_removes_a_left_over_spool_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(tmp_path)
    instance_id = receive(ctx, ct())
    job = ctx.queue.lease("test", [JobKind.DEIDENTIFY], 60)
    assert job is not None

    def crash(locators: list[str], **_: object) -> None:
        raise KeyboardInterrupt("killed after the commit, before the spool item was deleted")

    with monkeypatch.context() as m:
        m.setattr(ctx.spool, "delete_many", crash)
        with pytest.raises(KeyboardInterrupt):
            deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.DEIDENTIFIED.value
    assert row.spool_name is not None and ctx.spool.exists(row.spool_name)
    deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]  # the same job again
    assert not ctx.spool.exists(row.spool_name)
    again = instance(ctx, instance_id)
    assert again.blob_ref == row.blob_ref
    with ctx.db.session() as s:
        study = s.get(Study, row.study_key)
        assert study is not None and study.version == 1
        assert s.execute(select(DeidInstance)).scalars().all().__len__() == 1


@pytest.mark.parametrize("error", [RuntimeError, DatabaseUnavailable])
def test_crash_before_commit_then_rerun(tmp_path: Path, error: type[Exception]) -> None:
    """The blob was written but the rows were not: the re-run finishes the work once. A
    transaction that failed removes its blob; one whose commit may have landed (the database
    went away) keeps it for the orphan sweep."""
    ctx = make_ctx(tmp_path)
    instance_id = receive(ctx, ct())
    with pytest.MonkeyPatch.context() as mp:
        def boom(*args: object, **kwargs: object) -> None:
            raise error("power cut")

        mp.setattr(vault, "store_many", boom)  # the writes of the batch record
        job = ctx.queue.lease("test", [JobKind.DEIDENTIFY], 60)
        assert job is not None
        with pytest.raises(error):
            deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.RECEIVED.value
    assert row.spool_name is not None and ctx.spool.exists(row.spool_name)
    left = ctx.blobs.packs.names()
    assert len(left) == (1 if error is DatabaseUnavailable else 0)
    deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.DEIDENTIFIED.value
    assert sorted(ctx.blobs.packs.names()) == sorted([*left, row.blob_ref])
    assert remove_orphan_blobs(ctx, older_than_seconds=0) == len(left)
    assert ctx.blobs.packs.names() == [row.blob_ref]


def test_orphan_blob_sweep_removes_only_old_unreferenced_blobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(tmp_path)
    two_hours_ago = time.time() - 7200
    with monkeypatch.context() as m:
        m.setattr(spool_module.time, "time", lambda: two_hours_ago)
        instance_id = receive(ctx, ct())
        run_one(ctx)  # its blob is two hours old and referenced
        [orphan_old] = ctx.blobs.put_many([b"stored, then killed before the commit"])
    orphan_new = ctx.blobs.put(b"its commit may be running right now")
    ref = instance(ctx, instance_id).blob_ref
    assert ref is not None and ref.startswith("seg-")

    # Packs not written to within the window are not read (the orphan is in a recent one).
    assert remove_orphan_blobs(ctx, window_seconds=0) == 0
    assert remove_orphan_blobs(ctx) == 1
    assert sorted(ctx.blobs.packs.names()) == sorted([ref, orphan_new])
    assert not ctx.blobs.exists(orphan_old)
    assert read(ctx.blobs.get(ref)).SOPInstanceUID  # the referenced blob is whole
    assert remove_orphan_blobs(ctx) == 0


def complete_study(ctx: JobContext, study: dicomgen.FakeStudy) -> str:
    """Receive and de-identify the first instance of *study*, then mark the study complete;
    return its key."""
    first = receive(ctx, ct(study, index=0))
    run_one(ctx)
    key = instance(ctx, first).study_key
    with ctx.db.session() as s:
        s.execute(update(Study).where(Study.study_key == key)
                  .values(state=StudyState.COMPLETE.value, completed_at=datetime.now(UTC)))
    return key


def test_instance_for_a_complete_study_reopens_it(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    study = dicomgen.FakeStudy()
    key = complete_study(ctx, study)
    receive(ctx, ct(study, index=1))
    run_one(ctx)
    with ctx.db.session() as s:
        row = s.get(Study, key)
        assert row is not None
        assert (row.state, row.version, row.completed_at) == (StudyState.RECEIVING.value, 2, None)


@pytest.mark.parametrize("budget", [1, 2])
def test_a_batch_of_large_instances_holds_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    """A batch reads ahead and leaves writes pending within ``BATCH_IO_BYTES``, and lets an
    output's bytes go once written: the memory a batch of large instances takes is a few of
    them, not the batch (measured with tracemalloc over the worker's own batch path)."""
    import tracemalloc

    import node.pipeline.deidentify as deid
    from node.worker import Worker

    ctx = make_ctx(tmp_path)
    study = dicomgen.FakeStudy()
    count = 12
    ids = [receive(ctx, ct(study, size=1024, index=i)) for i in range(count)]  # ≈ 2 MiB each
    with ctx.db.session() as s:
        record = max(spool_module.record_length(r.spool_name) for r in
                     s.execute(select(Instance)).scalars())
    monkeypatch.setattr(deid, "BATCH_IO_BYTES", budget * record)
    jobs = ctx.queue.lease_many("test", [JobKind.DEIDENTIFY], 60, 32)
    assert len(jobs) == count
    worker = Worker(ctx, load_handlers(), periodic=False)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        worker.run_jobs(jobs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # In hand: the record being de-identified and its output; ahead and behind: the budget
    # (at least one each); and pydicom's working copies. The batch itself is 12 records.
    assert peak < (4 + 2 * budget) * record, (peak, record)
    assert ctx.queue.counts() == {(JobKind.DEIDENTIFY.value, JobState.DONE): count}
    with ctx.db.session() as s:
        sizes = {d.blob_ref: d.size_bytes for d in s.execute(select(DeidInstance)).scalars()}
    assert len(sizes) == count
    for i in ids:
        row = instance(ctx, i)
        assert row.state == InstanceState.DEIDENTIFIED.value
        assert len(ctx.blobs.get(row.blob_ref)) == sizes[row.blob_ref] > record // 2


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_batch_is_recorded_alike_on_both_databases(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """The worker's batch path (prepared statements run on the DBAPI cursor): two studies,
    one of them complete and re-opened by the batch, recorded and completed in one
    transaction on SQLite and on PostgreSQL."""
    from node.worker import Worker

    url = request.getfixturevalue("pg_url") if backend == "postgresql" else None
    ctx = make_ctx(tmp_path, url=url)
    done, other = dicomgen.FakeStudy(), dicomgen.FakeStudy()
    key = complete_study(ctx, done)
    ids = [receive(ctx, ct(done, index=i)) for i in (1, 2)]
    ids += [receive(ctx, ct(other, index=i)) for i in (0, 1, 2)]
    jobs = ctx.queue.lease_many("test", [JobKind.DEIDENTIFY], 60, 32)
    assert len(jobs) == 5
    Worker(ctx, load_handlers(), periodic=False).run_jobs(jobs)

    rows = [instance(ctx, i) for i in ids]
    assert {r.state for r in rows} == {InstanceState.DEIDENTIFIED.value}
    assert all(r.blob_ref and r.updated_at > r.received_at for r in rows)
    counts = ctx.queue.counts()
    assert counts == {(JobKind.DEIDENTIFY.value, JobState.DONE): 6}
    with ctx.db.session() as s:
        reopened = s.get(Study, key)
        assert reopened is not None
        assert (reopened.state, reopened.version, reopened.completed_at) == (
            StudyState.RECEIVING.value, 2, None)
        second = s.get(Study, rows[-1].study_key)
        assert second is not None and (second.state, second.version) == (
            StudyState.RECEIVING.value, 1)
        assert second.patient_key and second.last_received_at.tzinfo is not None
        deid = {d.sop_key: d for d in s.execute(select(DeidInstance)).scalars()}
        assert {r.sop_key for r in rows} <= set(deid)
        assert all(deid[r.sop_key].blob_ref == r.blob_ref for r in rows)
        events = s.execute(select(AuditEvent).where(AuditEvent.event == "deidentified")
                           ).scalars().all()
        assert len(events) == 6
        assert {e.detail["sop_key"] for e in events} >= {r.sop_key for r in rows}
        assert {row.modality for row in s.execute(select(Series)).scalars()} == {"CT"}
    for r in rows:
        assert read(ctx.blobs.get(r.blob_ref)).SOPInstanceUID == r.sop_key
    assert set(vault.load_instances(ctx.db, ctx.keys, rows[-1].study_key)) == {
        r.sop_key for r in rows[2:]}
    ctx.db.dispose()


def test_syntaxes_through_the_job(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    for syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        instance_id = receive(ctx, ct(), syntax)
        run_one(ctx)
        row = instance(ctx, instance_id)
        assert row.blob_ref is not None
        out = read(ctx.blobs.get(row.blob_ref))
        implicit = syntax == ImplicitVRLittleEndian
        expected = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        assert out.file_meta.TransferSyntaxUID == expected


def burned_in_us() -> Dataset:
    ds = dicomgen.base_dataset(dicomgen.FakeStudy(), UltrasoundImageStorage, "US",
                               generate_uid(), 1, 1)
    ds.Manufacturer, ds.ManufacturerModelName = "ACME", "SONO-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = 16, 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.BurnedInAnnotation = "YES"
    ds.PixelData = np.full((16, 16), 200, np.uint8).tobytes()
    return ds


def test_rejected_instance_and_retention_sweep(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    instance_id = receive(ctx, burned_in_us())
    run_one(ctx)  # the job completes: a rejection is an outcome, not a failure
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.REJECTED.value
    assert row.reject_reason is not None and "no pixel rule matches" in row.reject_reason
    assert "DOE" not in row.reject_reason
    assert row.spool_name is not None and ctx.spool.exists(row.spool_name)
    with ctx.db.session() as s:
        events = {e.event: e for e in s.execute(select(AuditEvent)).scalars()}
    assert events["instance-rejected"].detail["sop_key"] == row.sop_key

    assert remove_rejected_spool(ctx) == 0  # within the 72 h retention
    with ctx.db.session() as s:
        s.execute(update(Instance).where(Instance.id == instance_id)
                  .values(updated_at=datetime.now(UTC) - timedelta(hours=73)))
    assert remove_rejected_spool(ctx) == 1
    assert not ctx.spool.exists(row.spool_name)
    assert instance(ctx, instance_id).spool_name is None
    assert remove_rejected_spool(ctx) == 0


def test_orphan_sweep_removes_only_old_unneeded_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(tmp_path)
    two_hours_ago = time.time() - 7200
    with monkeypatch.context() as m:
        m.setattr(spool_module.time, "time", lambda: two_hours_ago)
        queued = receive(ctx, ct())  # not yet de-identified: its item must stay
        done = receive(ctx, ct())  # de-identified; a crash undid the deletion of its item
        orphan_old = ctx.spool.put(b"written, then killed before the commit")
    orphan_new = ctx.spool.put(b"its commit may be running right now")
    ctx.spool.close()
    kept, undone = instance(ctx, queued).spool_name, instance(ctx, done).spool_name
    assert kept is not None and undone is not None
    with ctx.db.session() as s:
        s.execute(
            update(Instance)
            .where(Instance.id == done)
            .values(state=InstanceState.DEIDENTIFIED.value)
        )

    assert remove_orphan_spool(ctx) == 2
    assert ctx.spool.names() == sorted([kept, orphan_new])
    assert not ctx.spool.exists(orphan_old) and not ctx.spool.exists(undone)
    run_one(ctx)  # the queued instance (the first job) still de-identifies from its item
    assert instance(ctx, queued).state == InstanceState.DEIDENTIFIED.value


def test_admitted_with_a_pixel_rule(tmp_path: Path) -> None:
    rule = PixelRule(name="acme", manufacturer="ACME", rectangles=[(0, 0, 4, 4)])
    ctx = make_ctx(tmp_path, pixel_rules=[rule])
    instance_id = receive(ctx, burned_in_us())
    run_one(ctx)
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.DEIDENTIFIED.value and row.blob_ref
    arr = read(ctx.blobs.get(row.blob_ref)).pixel_array
    assert not arr[:4, :4].any() and (arr[4:, 4:] == 200).all()


def test_residue_dead_letters_naming_the_attribute_only(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    ds = ct()
    ds.PatientName = "ROUTINE^X"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ROUTINE"]
    instance_id = receive(ctx, ds)
    job = ctx.queue.lease("test", [JobKind.DEIDENTIFY], 60)
    assert job is not None
    with pytest.raises(PermanentJobError) as err:
        deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]
    assert "PatientName" in str(err.value) and "ROUTINE" not in str(err.value)
    row = instance(ctx, instance_id)
    assert row.state == InstanceState.FAILED.value
    assert row.spool_name is not None and ctx.spool.exists(row.spool_name)  # nothing lost


def test_missing_spool_item_is_permanent(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    instance_id = receive(ctx, ct())
    name = instance(ctx, instance_id).spool_name
    assert name is not None
    ctx.spool.delete(name)
    job = ctx.queue.lease("test", [JobKind.DEIDENTIFY], 60)
    assert job is not None
    with pytest.raises(PermanentJobError, match="spool item"):
        deidentify_job(job, parse_payload(job.kind, job.payload), ctx)  # type: ignore[arg-type]


_CHILD = """
import hashlib, sys
from node.config import DeidSection
from node.deid.engine import Deidentifier
from node.keys import NodeKeys
keys = NodeKeys.from_master(bytes.fromhex(sys.argv[1]))
data = open(sys.argv[2], "rb").read()
result = Deidentifier(DeidSection(), keys.site).deidentify(data, sys.argv[3])
print(hashlib.sha256(result.data).hexdigest())
"""


def test_same_output_in_other_processes_and_not_with_another_key(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    ds = ct()
    instance_id = receive(ctx, ds)
    run_one(ctx)
    ref = instance(ctx, instance_id).blob_ref
    digest = hashlib.sha256(ctx.blobs.get(ref or "")).hexdigest()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(encode(ds))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}

    def child(master: bytes) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, master.hex(), str(raw), ExplicitVRLittleEndian],
            capture_output=True, text=True, check=True, env=env, cwd=root,
        )
        return proc.stdout.strip()

    assert child(MASTER) == digest  # another process
    assert child(MASTER) == digest  # and again (a restart)
    assert child(bytes(32)) != digest  # another site's key
