"""Report and export on the node's real storage, real de-identification and a real PACS (DCMTK
``storescp``): the SR files under the original patient and study, references the original
instances, carries no pseudonym, validates; a newer version references its predecessor; a PACS
that is down gets the SR exactly once after retries; dead deliveries are retried; the outbox is
emptied after the retention period.

The ``Result`` rows are written by the test as the inference stage writes them (the encrypted
inference itself is tested end to end in the acceptance suite).
"""

from __future__ import annotations

import copy
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from node.config import ExportDestination, ExportSection, WorkersSection
from node.deid.pseudonyms import token, uid_pseudonym
from node.jobs import JobContext, JobKind, load_handlers
from node.pipeline.assemble import sweep
from node.pipeline.export import EXPORT_KIND, destinations, outbox_of, retry_exports
from node.pipeline.report import REPORT_KIND, report_sweep, sr_instance_uid
from node.report.status import study_progress
from node.tasks import load_tasks
from node.worker import Worker
from storage.models import AuditEvent, DeidInstance, Report, ReportExport, Result, Series, Study
from storage.records import ExportState, JobState, ReportState
from tests.support.node import free_port
from tests.support.reports import StoreSCP, dciodvfy_errors
from tests.support.storage import make_context, receive_instance

pytestmark = pytest.mark.dcmtk

DEIDENTIFY = JobKind.DEIDENTIFY.value


def _context(root: Path, pacs_port: int, *, max_attempts: int = 5) -> JobContext:
    ctx = make_context(root, quiet_period_seconds=0, sweep_seconds=0.01)
    ctx.settings = ctx.settings.model_copy(
        update={
            "export": ExportSection(
                destinations=[
                    ExportDestination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                      port=pacs_port)
                ],
                max_attempts=max_attempts,
                timeout_seconds=5,
            ),
            "workers": WorkersSection(backoff_seconds=0.05, backoff_max_seconds=0.1),
        }
    )
    return ctx


def _run(ctx: JobContext, kind: str) -> list[JobState | None]:
    handlers = load_handlers()
    worker = Worker(ctx, {kind: handlers[kind]}, name="t", periodic=False)
    outcomes = []
    while (job := ctx.queue.lease("t", [kind], 60)) is not None:
        outcomes.append(worker.run_one(job))
    return outcomes


def _ingest(ctx: JobContext, datasets: list[Dataset]) -> None:
    for ds in datasets:
        receive_instance(ctx, ds)
    assert set(_run(ctx, DEIDENTIFY)) == {JobState.DONE}
    sweep(ctx, now=datetime.now(UTC) + timedelta(seconds=5))


def _result(ctx: JobContext, study_key: str, version: int, probability: float) -> int:
    """What the inference stage writes for one version of a study."""
    with ctx.db.session() as s:
        s.execute(
            update(Result)
            .where(Result.study_key == study_key, Result.study_version < version)
            .values(superseded=True)
        )
        row = Result(
            study_key=study_key, task="chest_xray", study_version=version,
            label="pneumonia" if probability >= 0.5 else "no_pneumonia",
            probability=probability, model_id="chest-model-1", model_version="2",
        )
        s.add(row)
        s.flush()
        return row.id


def _pseudonyms(ctx: JobContext, study: Dataset) -> list[str]:
    """Every pseudonym the node made for *study* (keys in the database, de-identified ids)."""
    site = ctx.keys.site
    out = [uid_pseudonym(site, str(study.StudyInstanceUID))]
    with ctx.db.session() as s:
        row = s.get(Study, out[0])
        assert row is not None
        out += [k for k in (row.patient_key, row.accession_key) if k]
        out += list(s.execute(select(DeidInstance.sop_key)).scalars())
        out += list(s.execute(select(Series.series_key)).scalars())
    out.append(token(site, "patient-id", str(study.PatientID)))
    return out


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) missing")
def test_report_goes_back_under_the_original_patient_and_study(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as pacs:
        ctx = _context(tmp_path / "node", pacs.port)
        plugin = load_tasks(ctx.settings)["chest_xray"]
        (generated,) = plugin.synthetic_studies(1, seed=5, image_size=64)
        original = generated.datasets[0]
        _ingest(ctx, list(generated.datasets))
        study_key = uid_pseudonym(ctx.keys.site, generated.study_instance_uid)
        result_id = _result(ctx, study_key, 1, 0.91)

        assert report_sweep(ctx)["report_jobs"] == 1
        assert report_sweep(ctx)["report_jobs"] == 0  # one job per result, ever
        assert _run(ctx, REPORT_KIND) == [JobState.DONE]
        with ctx.db.session() as s:
            report = s.execute(select(Report)).scalar_one()
            assert report.result_id == result_id and report.state == ReportState.PENDING
            raw = outbox_of(ctx).path(report.outbox_name or "").read_bytes()
        assert str(original.PatientID).encode() not in raw  # encrypted at rest
        assert _run(ctx, EXPORT_KIND) == [JobState.DONE]
        (sr,) = pacs.wait_for(1)

    for keyword in ("PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID",
                    "PatientBirthDate", "StudyDate"):
        assert str(sr[keyword].value) == str(original[keyword].value), keyword
    path = tmp_path / "received.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    back = highdicom.sr.srread(path)
    assert {uid for _, _, uid, _ in back.get_evidence()} == {
        str(ds.SOPInstanceUID) for ds in generated.datasets if plugin.accepts(ds)
    }
    assert str(back.SOPInstanceUID) == sr_instance_uid(ctx.keys.site, study_key, "chest_xray", 1)
    data = path.read_bytes()
    for pseudonym in _pseudonyms(ctx, original):
        assert pseudonym.encode() not in data, "a pseudonym of the node is in the SR"
    assert b"chest-model-1" in data and b"CKKS" in data
    with ctx.db.session() as s:
        report = s.execute(select(Report)).scalar_one()
        delivery = s.execute(select(ReportExport)).scalar_one()
    assert report.state == ReportState.EXPORTED and report.exported_at is not None
    assert delivery.state == ExportState.SENT and delivery.attempts == 1
    assert delivery.last_status == 0

    with ctx.db.session() as s:
        events = {e.event: e for e in s.execute(select(AuditEvent)).scalars()}
    assert events["report-created"].detail["study_key"] == study_key
    assert events["report-exported"].detail["destination"] == "pacs"
    assert str(original.PatientID) not in str([e.detail for e in events.values()])

    progress = {p.study_key: p for p in study_progress(ctx.db)}
    assert progress[study_key].step == "exported"
    assert progress[study_key].times["exported"] is not None

    # The outbox keeps the SR for the retention period, then deletes it.
    box = outbox_of(ctx)
    assert report.outbox_name in box.names()
    assert report_sweep(ctx)["purged"] == 0
    later = datetime.now(UTC) + timedelta(hours=ctx.settings.export.retention_hours + 1)
    assert report_sweep(ctx, now=later)["purged"] == 1
    assert report.outbox_name not in box.names()
    with ctx.db.session() as s:
        purged = s.execute(select(Report)).scalar_one()
    assert purged.outbox_name is None and purged.purged_at is not None


def test_a_newer_version_references_the_sr_it_replaces(tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "pacs") as pacs:
        ctx = _context(tmp_path / "node", pacs.port)
        plugin = load_tasks(ctx.settings)["chest_xray"]
        (generated,) = plugin.synthetic_studies(1, seed=9, image_size=64)
        _ingest(ctx, list(generated.datasets))
        study_key = uid_pseudonym(ctx.keys.site, generated.study_instance_uid)
        _result(ctx, study_key, 1, 0.2)
        report_sweep(ctx)
        _run(ctx, REPORT_KIND)
        _run(ctx, EXPORT_KIND)
        (first,) = pacs.wait_for(1)

        # The study is re-sent with one more image: version 2, a new result, a new SR.
        extra = copy.deepcopy(generated.datasets[0])
        extra.SOPInstanceUID = generate_uid()
        extra.InstanceNumber = 2
        _ingest(ctx, [extra])
        with ctx.db.session() as s:
            assert s.get(Study, study_key).version == 2  # type: ignore[union-attr]
        _result(ctx, study_key, 2, 0.7)
        report_sweep(ctx)
        _run(ctx, REPORT_KIND)
        _run(ctx, EXPORT_KIND)
        received = pacs.wait_for(2)
    second = next(ds for ds in received if ds.SOPInstanceUID != first.SOPInstanceUID)
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2
    pre = second.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == generated.study_instance_uid
    ref = pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == first.SOPClassUID
    assert "PredecessorDocumentsSequence" not in first


def test_pacs_down_then_up_gets_the_sr_exactly_once(tmp_path: Path) -> None:
    port = free_port()
    ctx = _context(tmp_path / "node", port, max_attempts=3)
    plugin = load_tasks(ctx.settings)["chest_xray"]
    (generated,) = plugin.synthetic_studies(1, seed=11, image_size=64)
    _ingest(ctx, list(generated.datasets))
    study_key = uid_pseudonym(ctx.keys.site, generated.study_instance_uid)
    _result(ctx, study_key, 1, 0.6)
    report_sweep(ctx)
    _run(ctx, REPORT_KIND)

    # Down: the attempt fails, the job waits for its retry.
    assert _run(ctx, EXPORT_KIND) == [JobState.QUEUED]
    with ctx.db.session() as s:
        delivery = s.execute(select(ReportExport)).scalar_one()
    assert delivery.state == ExportState.QUEUED and delivery.attempts == 1
    assert "cannot associate" in (delivery.last_error or "")

    with StoreSCP(tmp_path / "pacs", port=port) as pacs:
        import time

        time.sleep(0.2)  # past the (test's short) backoff
        assert _run(ctx, EXPORT_KIND) == [JobState.DONE]
        assert _run(ctx, EXPORT_KIND) == []
        received = pacs.wait_for(1)
        time.sleep(0.5)
        assert len(pacs.received()) == 1
    assert received[0].PatientID == generated.datasets[0].PatientID
    with ctx.db.session() as s:
        delivery = s.execute(select(ReportExport)).scalar_one()
    assert delivery.state == ExportState.SENT and delivery.attempts == 2


def test_dead_delivery_is_retried_by_the_operator(tmp_path: Path) -> None:
    import time

    port = free_port()
    ctx = _context(tmp_path / "node", port, max_attempts=2)
    plugin = load_tasks(ctx.settings)["chest_xray"]
    (generated,) = plugin.synthetic_studies(1, seed=13, image_size=64)
    _ingest(ctx, list(generated.datasets))
    study_key = uid_pseudonym(ctx.keys.site, generated.study_instance_uid)
    _result(ctx, study_key, 1, 0.4)
    report_sweep(ctx)
    _run(ctx, REPORT_KIND)
    assert _run(ctx, EXPORT_KIND) == [JobState.QUEUED]
    time.sleep(0.2)
    assert _run(ctx, EXPORT_KIND) == [JobState.DEAD]
    with ctx.db.session() as s:
        delivery = s.execute(select(ReportExport)).scalar_one()
    assert delivery.state == ExportState.DEAD and delivery.attempts == 2

    with StoreSCP(tmp_path / "pacs", port=port) as pacs:
        assert retry_exports(ctx) == 1
        assert _run(ctx, EXPORT_KIND) == [JobState.DONE]
        assert len(pacs.wait_for(1)) == 1
    with ctx.db.session() as s:
        delivery = s.execute(select(ReportExport)).scalar_one()
        report = s.execute(select(Report)).scalar_one()
    assert delivery.state == ExportState.SENT and delivery.attempts == 1
    assert report.state == ReportState.EXPORTED


def test_destinations_from_peer_entries_and_config_errors(tmp_path: Path) -> None:
    from node.config import DicomSection, Peer
    from node.errors import ConfigError

    ctx = make_context(tmp_path)
    settings = ctx.settings.model_copy(
        update={
            "dicom": DicomSection(peers=[Peer(ae_title="PACS", host="10.0.0.5", port=104)]),
            "export": ExportSection(destinations=[ExportDestination(peer="PACS")]),
        }
    )
    (dest,) = destinations(settings).values()
    assert (dest.name, dest.ae_title, dest.host, dest.port) == ("pacs", "PACS", "10.0.0.5", 104)
    assert dest.calling_ae == settings.node.ae_title
    bad = settings.model_copy(
        update={"export": ExportSection(destinations=[ExportDestination(peer="NOPE")])}
    )
    with pytest.raises(ConfigError, match=r"export.destinations\[0\].peer"):
        destinations(bad)
    bad = settings.model_copy(
        update={"export": ExportSection(destinations=[ExportDestination(ae_title="X")])}
    )
    with pytest.raises(ConfigError, match="host, port"):
        destinations(bad)


@pytest.mark.postgres
def test_report_sweep_queries_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    """The sweep's SQL (job-key concatenation, per-destination counts, retention) on PostgreSQL."""
    from node.config import NodeSection, Settings
    from node.keys import NodeKeys
    from storage.db import Database
    from storage.queue import SqlQueue

    db = Database(pg_url)
    db.upgrade()
    settings = Settings(
        node=NodeSection(data_dir=tmp_path),
        export=ExportSection(destinations=[
            ExportDestination(name="a", ae_title="A", host="127.0.0.1", port=1),
            ExportDestination(name="b", ae_title="B", host="127.0.0.1", port=2),
        ]),
    )
    ctx = JobContext(settings=settings, db=db, queue=SqlQueue(db),
                     keys=NodeKeys.from_master(bytes(32)))
    try:
        result_id = _result(ctx, "2.25.1", 1, 0.5)
        assert report_sweep(ctx)["report_jobs"] == 1
        assert report_sweep(ctx)["report_jobs"] == 0
        with ctx.db.session() as s:
            report = Report(result_id=result_id, study_key="2.25.1", task="chest_xray",
                            study_version=1, sop_class_uid="1.2", state=ReportState.PENDING,
                            outbox_name="report-1")
            s.add(report)
            s.flush()
            s.add(ReportExport(report_id=report.id, destination="a", state="sent"))
        assert report_sweep(ctx)["deliveries"] == 1  # only "b" was missing
        assert report_sweep(ctx)["deliveries"] == 0
        with ctx.db.session() as s:
            s.execute(update(Report).values(state=ReportState.EXPORTED,
                                            exported_at=datetime.now(UTC) - timedelta(days=9)))
        assert report_sweep(ctx)["purged"] == 1
    finally:
        db.dispose()
