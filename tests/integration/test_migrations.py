"""Alembic migrations and the typed models do not drift, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from storage.db import Database
from storage.errors import NotMigrated
from storage.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    else:
        db = Database(request.getfixturevalue("pg_url"))
    yield db
    db.dispose()


def test_unmigrated_database_is_refused_with_the_fix(fresh: Database) -> None:
    with pytest.raises(NotMigrated, match="fednode db upgrade"):
        fresh.check_migrated()


def test_upgrade_reaches_head_and_models_match(fresh: Database) -> None:
    fresh.upgrade()
    fresh.check_migrated()
    with fresh.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations drift: {diff}"


def test_upgrade_is_idempotent(fresh: Database) -> None:
    fresh.upgrade()
    fresh.upgrade()
    assert fresh.current_revision() == fresh.head_revision()


def test_blob_refs_downgrade_refuses_while_pack_records_are_named(fresh: Database) -> None:
    """0005's downgrade runs on an empty node, and refuses, naming why, while a row names a
    pack record (its locator does not fit the old column and earlier builds cannot read it);
    the schema is left as it was."""
    from sqlalchemy import text

    fresh.upgrade()
    fresh.downgrade("0004_reports")
    fresh.upgrade()
    with fresh.session() as s:
        s.execute(text(
            "INSERT INTO instances (sop_key, study_key, series_key, sop_class_uid,"
            " transfer_syntax_uid, calling_ae, size_bytes, state, blob_ref, received_at,"
            " updated_at) VALUES ('s', 't', 'r', '1.2', '1.2.840.10008.1.2.1', 'PACS', 1,"
            " 'deidentified', :ref, :now, :now)"),
            {"ref": "seg-20261208T010000-1234-abcdef01@0+524304",
             "now": datetime.now(UTC)})
    with pytest.raises(RuntimeError, match=r"1 row\(s\) name de-identified instances stored "
                                           r"in the blob packs"):
        fresh.downgrade("0004_reports")
    with fresh.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0005_blob_refs"
