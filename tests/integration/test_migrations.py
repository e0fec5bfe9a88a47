"""Alembic migrations and the typed models do not drift, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

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
