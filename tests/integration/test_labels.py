"""Label import on real SQLite: by accession number, by study UID, all or nothing, no PHI."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.jobs import JobContext
from node.tasks import load_tasks
from node.tasks.labels import LabelFileError, import_labels, label_counts
from plugins.base import TaskPlugin
from storage.models import AuditEvent, Label
from tests.support.dicomgen import FakePatient, FakeStudy, dx_instance
from tests.support.storage import DeidStore, make_context


@pytest.fixture
def ctx(tmp_path: Path) -> JobContext:
    return make_context(tmp_path)


@pytest.fixture
def tasks(ctx: JobContext) -> dict[str, TaskPlugin]:
    return load_tasks(ctx.settings)


@pytest.fixture
def studies(ctx: JobContext) -> list[FakeStudy]:
    """Three stored studies with distinct patients and accession numbers."""
    store = DeidStore(ctx)
    out = []
    for i in range(3):
        patient = FakePatient(name=f"PATIENT^NUMBER{i}", patient_id=f"MRN-77{i}")
        study = FakeStudy(patient=patient, accession=f"ACC-9{i}")
        store.add(dx_instance(study, generate_uid(), 0, size=16))
        out.append(study)
    return out


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def stored_labels(ctx: JobContext) -> dict[tuple[str, str], str]:
    with ctx.db.session() as s:
        return {(r.study_key, r.task): r.label for r in s.execute(select(Label)).scalars()}


def test_import_by_accession_number(
    ctx: JobContext, tasks: dict[str, TaskPlugin], studies: list[FakeStudy], tmp_path: Path
) -> None:
    store = DeidStore(ctx)
    path = write(tmp_path, "Accession_Number,chest_xray\nACC-90,pneumonia\nACC-91,0\n")
    report = import_labels(ctx.db, ctx.keys.site, tasks, path)
    assert report.imported and report.ok and report.inserted == 2
    assert stored_labels(ctx) == {
        (store.study_key(studies[0].study_uid), "chest_xray"): "pneumonia",
        (store.study_key(studies[1].study_uid), "chest_xray"): "no_pneumonia",
    }
    assert label_counts(ctx.db, tasks)[0].with_images == 1


def test_import_by_study_uid_and_update(
    ctx: JobContext, tasks: dict[str, TaskPlugin], studies: list[FakeStudy], tmp_path: Path
) -> None:
    store = DeidStore(ctx)
    rows = "".join(
        f"{s.study_uid},{lab}\n" for s, lab in zip(studies, ["1", "0", "yes"], strict=True)
    )
    path = write(tmp_path, "study_instance_uid;chest_xray\n".replace(";", ",") + rows)
    report = import_labels(ctx.db, ctx.keys.site, tasks, path)
    assert report.imported and report.inserted == 3
    assert report.per_task == {"chest_xray": {"pneumonia": 2, "no_pneumonia": 1}}
    # a corrected file updates one label, keeps the others; semicolons work too
    fixed = write(
        tmp_path,
        "study_instance_uid;accession_number;chest_xray\n"
        f"{studies[0].study_uid};ACC-90;no_pneumonia\n{studies[1].study_uid};;no_pneumonia\n",
    )
    report = import_labels(ctx.db, ctx.keys.site, tasks, fixed)
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 1)
    labels = stored_labels(ctx)
    assert labels[(store.study_key(studies[0].study_uid), "chest_xray")] == "no_pneumonia"
    assert labels[(store.study_key(studies[2].study_uid), "chest_xray")] == "pneumonia"
    counts = {(c.task, c.label): c.studies for c in label_counts(ctx.db, tasks)}
    assert counts == {("chest_xray", "no_pneumonia"): 2, ("chest_xray", "pneumonia"): 1}
    with ctx.db.session() as s:
        events = s.execute(select(AuditEvent).where(AuditEvent.event == "labels-imported"))
        details = [e.detail for e in events.scalars()]
    assert [d["inserted"] for d in details] == [3, 0]


def test_one_bad_row_imports_nothing(
    ctx: JobContext, tasks: dict[str, TaskPlugin], studies: list[FakeStudy], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "accession_number,study_instance_uid,chest_xray\n"
        "ACC-90,,pneumonia\n"  # fine
        "ACC-91,,maybe\n"  # line 3: not a class
        ",,pneumonia\n"  # line 4: no key
        "ACC-92,1.2.3.x,no_pneumonia\n"  # line 5: malformed UID
        f"ACC-90,{studies[1].study_uid},pneumonia\n"  # line 6: keys disagree
        "ACC-90,,no_pneumonia\n"  # line 7: contradicts line 2
        "ACC-92\n",  # line 8: too few fields
    )
    report = import_labels(ctx.db, ctx.keys.site, tasks, path)
    assert not report.imported
    assert [p.line for p in report.bad] == [3, 4, 5, 6, 7, 8]
    assert "not a class of task chest_xray" in report.bad[0].reason
    assert "maybe" not in report.bad[0].reason.split("(")[0]
    assert "different studies" in report.bad[3].reason
    assert "contradicts line 2" in report.bad[4].reason
    assert stored_labels(ctx) == {}


def test_unknown_keys_are_reported_and_block_unless_skipped(
    ctx: JobContext, tasks: dict[str, TaskPlugin], studies: list[FakeStudy], tmp_path: Path
) -> None:
    unknown_uid = generate_uid()
    path = write(
        tmp_path,
        "study_instance_uid,accession_number,chest_xray\n"
        f"{studies[0].study_uid},,pneumonia\n"
        f"{unknown_uid},,pneumonia\n"
        ",NOT-STORED-1,0\n",
    )
    report = import_labels(ctx.db, ctx.keys.site, tasks, path)
    assert not report.imported and not report.bad
    assert [p.line for p in report.unknown] == [3, 4]
    assert all(unknown_uid not in p.reason and "NOT-STORED" not in p.reason for p in report.unknown)
    assert stored_labels(ctx) == {}
    dry = import_labels(ctx.db, ctx.keys.site, tasks, path, skip_unknown=True, dry_run=True)
    assert not dry.imported and stored_labels(ctx) == {}
    report = import_labels(ctx.db, ctx.keys.site, tasks, path, skip_unknown=True)
    assert report.imported and report.inserted == 1 and len(report.unknown) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chest_xray\npneumonia\n", "needs a study_instance_uid or accession_number column"),
        ("accession_number,lung_nodule\nACC-90,1\n", "'lung_nodule' name no enabled task"),
        ("accession_number\nACC-90\n", "no task column"),
        ("", "is empty"),
    ],
)
def test_bad_headers_are_refused(
    ctx: JobContext, tasks: dict[str, TaskPlugin], tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(LabelFileError, match=message):
        import_labels(ctx.db, ctx.keys.site, tasks, write(tmp_path, text))


def test_no_phi_reaches_the_database(
    ctx: JobContext, tasks: dict[str, TaskPlugin], studies: list[FakeStudy], tmp_path: Path
) -> None:
    path = write(
        tmp_path,
        "study_instance_uid,accession_number,chest_xray\n"
        + "".join(f"{s.study_uid},{s.accession},pneumonia\n" for s in studies),
    )
    assert import_labels(ctx.db, ctx.keys.site, tasks, path).inserted == 3
    ctx.db.dispose()  # checkpoint: the WAL is folded into the database file
    files = [p for p in tmp_path.iterdir() if p.name.startswith("t.db")]
    raw = b"".join(p.read_bytes() for p in files)
    for study in studies:
        for identifier in (
            study.study_uid,
            study.accession,
            study.patient.name,
            study.patient.patient_id,
        ):
            assert identifier.encode() not in raw, identifier
    with ctx.db.session() as s:
        rows = s.execute(select(Label)).scalars().all()
    assert {r.study_key for r in rows} == {DeidStore(ctx).study_key(s.study_uid) for s in studies}
    assert all(r.study_key.startswith("2.25.") for r in rows)
