"""Put de-identified studies into a node's storage without running the de-identification job.

Tests of study assembly, labels, the dataset and training need what ``deidentify`` leaves
behind: the de-identified Part 10 bytes in the blob store and rows in ``instances``,
``studies``, ``series`` and ``deid_instances``. :class:`DeidStore` writes exactly that from an
identified dataset, standing in for ``node/pipeline/deidentify.py``:

- UIDs become the keyed pseudonyms (``uid_pseudonym(site_key, uid)``), so a test can compute
  the study key of an original Study Instance UID as the node does;
- ``studies.accession_key`` is ``token(site_key, "accession", AccessionNumber)`` and
  ``patient_key`` is ``token(site_key, "patient-id", PatientID)``;
- patient name, ID, birth date, accession number, institution and physician names are removed
  from the stored header (a crude de-identification: enough for these tests, not Annex E);
- a study's state and version follow the contract of the de-identification job: a new study is
  ``receiving`` at version 1, an instance for a ``complete`` study re-opens it and increments
  its version, and every instance sets ``last_received_at``.

It is a test helper: the real de-identification is ``node.pipeline.deidentify``.
"""

from __future__ import annotations

import copy
import secrets
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select

from node.config import NodeSection, Settings, TasksSection
from node.deid.pseudonyms import token, uid_pseudonym
from node.jobs import JobContext
from node.keys import NodeKeys
from storage.db import Database
from storage.models import DeidInstance, Instance, Series, Study
from storage.queue import SqlQueue
from storage.records import InstanceState, StudyState

REMOVED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "StationName",
    "DeviceSerialNumber",
    "StudyDescription",
    "ImageComments",
)


def make_context(root: Path, *, master: bytes | None = None, **tasks: object) -> JobContext:
    """A node context over a fresh, migrated SQLite database and blob store under *root*.

    *master* fixes the master secret (so pseudonyms, and the order of study keys, repeat);
    keyword arguments set ``[tasks]`` options (for example ``quiet_period_seconds=60``).
    """
    settings = Settings(node=NodeSection(data_dir=root), tasks=TasksSection(**tasks))  # type: ignore[arg-type]
    db = Database(f"sqlite:///{root / 't.db'}")
    db.upgrade()
    keys = NodeKeys.from_master(master or secrets.token_bytes(32))
    return JobContext(settings=settings, db=db, queue=SqlQueue(db), keys=keys)


class DeidStore:
    """Writes de-identified instances into the storage of *ctx* (see the module docstring)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.site = ctx.keys.site

    def study_key(self, study_instance_uid: str) -> str:
        return uid_pseudonym(self.site, study_instance_uid)

    def accession_key(self, accession_number: str) -> str:
        return token(self.site, "accession", accession_number)

    def deidentify(self, ds: Dataset) -> Dataset:
        out = copy.deepcopy(ds)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(out, keyword, uid_pseudonym(self.site, str(ds[keyword].value)))
        for keyword in REMOVED:
            if keyword in out:
                delattr(out, keyword)
        out.PatientIdentityRemoved = "YES"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = getattr(
            getattr(ds, "file_meta", None), "TransferSyntaxUID", ExplicitVRLittleEndian
        )
        out.file_meta = meta
        return out

    def pending(self, ds: Dataset, *, at: datetime | None = None) -> str:
        """Record *ds* as received but not yet de-identified (an ``instances`` row only)."""
        sop_key = uid_pseudonym(self.site, str(ds.SOPInstanceUID))
        with self.ctx.db.session() as s:
            s.add(
                Instance(
                    sop_key=sop_key,
                    study_key=uid_pseudonym(self.site, str(ds.StudyInstanceUID)),
                    series_key=uid_pseudonym(self.site, str(ds.SeriesInstanceUID)),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    calling_ae="TEST",
                    size_bytes=0,
                    state=InstanceState.RECEIVED.value,
                    received_at=at or datetime.now(UTC),
                )
            )
        return sop_key

    def add(self, ds: Dataset, *, at: datetime | None = None) -> str:
        """Store *ds* de-identified, as the de-identification job would; return its SOP key."""
        at = at or datetime.now(UTC)
        deid = self.deidentify(ds)
        buf = BytesIO()
        deid.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        ref = self.ctx.blobs.put(data)
        study_key = str(deid.StudyInstanceUID)
        series_key = str(deid.SeriesInstanceUID)
        sop_key = str(deid.SOPInstanceUID)
        with self.ctx.db.session() as s:
            study = s.get(Study, study_key)
            if study is None:
                accession = str(ds.get("AccessionNumber", "") or "")
                s.add(
                    Study(
                        study_key=study_key,
                        patient_key=token(self.site, "patient-id", str(ds.get("PatientID", ""))),
                        accession_key=self.accession_key(accession) if accession else None,
                        state=StudyState.RECEIVING.value,
                        version=1,
                        first_received_at=at,
                        last_received_at=at,
                    )
                )
                s.flush()
            else:
                if study.state == StudyState.COMPLETE.value:
                    study.version += 1
                    study.completed_at = None
                study.state = StudyState.RECEIVING.value
                study.last_received_at = at
            if s.get(Series, series_key) is None:
                s.add(
                    Series(
                        series_key=series_key,
                        study_key=study_key,
                        modality=str(ds.get("Modality", "")) or None,
                        body_part=str(ds.get("BodyPartExamined", "")) or None,
                        view_position=str(ds.get("ViewPosition", "")) or None,
                    )
                )
                s.flush()
            instance = s.execute(
                select(Instance).where(Instance.sop_key == sop_key)
            ).scalar_one_or_none()
            if instance is None:
                s.add(
                    Instance(
                        sop_key=sop_key,
                        study_key=study_key,
                        series_key=series_key,
                        sop_class_uid=str(ds.SOPClassUID),
                        transfer_syntax_uid=str(deid.file_meta.TransferSyntaxUID),
                        calling_ae="TEST",
                        size_bytes=len(data),
                        state=InstanceState.DEIDENTIFIED.value,
                        blob_ref=ref,
                        received_at=at,
                    )
                )
            else:
                instance.state = InstanceState.DEIDENTIFIED.value
                instance.blob_ref = ref
            s.add(
                DeidInstance(
                    sop_key=sop_key,
                    study_key=study_key,
                    series_key=series_key,
                    sop_class_uid=str(ds.SOPClassUID),
                    blob_ref=ref,
                    size_bytes=len(data),
                    created_at=at,
                )
            )
        return sop_key


def receive_instance(
    ctx: JobContext, ds: Dataset, syntax: str = ExplicitVRLittleEndian, calling_ae: str = "PACS"
) -> int:
    """Keep *ds* the way a C-STORE does, through the node's own
    :class:`~node.dicom.receive.Receiver` (encrypted spool item, instance row, ``deidentify``
    job); return the instance id."""
    from node.dicom.receive import Receiver
    from node.dicom.status import Status
    from tests.unit.deid_support import encode

    receiver = Receiver(
        db=ctx.db,
        queue=ctx.queue,
        spool=ctx.spool,
        site_key=ctx.keys.site,
        data_dir=ctx.settings.data_dir,
        free_space_floor_bytes=0,
    )
    outcome = receiver.store(
        encode(ds, syntax),
        transfer_syntax=syntax,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        calling_ae=calling_ae,
    )
    assert outcome.status is Status.SUCCESS, outcome.comment
    with ctx.db.session() as s:
        instance_id = s.scalar(select(Instance.id).where(Instance.sop_key == outcome.sop_key))
    assert instance_id is not None
    return instance_id
