"""Prepared statements (storage.db.Prepared) on real SQLite and PostgreSQL: what they store
is what SQLAlchemy would store (type processing, Python-side defaults, onupdate, the values
a statement was built with), and a DBAPI error becomes DatabaseUnavailable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import bindparam, insert, select, update

from storage.db import Database, Prepared
from storage.errors import DatabaseUnavailable
from storage.models import JobRow


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("sqlite_db" if request.param == "sqlite" else "pg_db")


def test_insert_update_and_select_store_what_the_orm_reads(db: Database) -> None:
    table = JobRow.__table__
    add = Prepared(db, insert(table).values(
        kind=bindparam("kind"), payload=bindparam("payload"), state="queued"), table=table)
    with db.transaction() as conn:
        add.run_many(conn, [{"kind": "demo", "payload": {"n": i}} for i in range(3)])
    with db.session() as s:
        rows = s.execute(select(JobRow).order_by(JobRow.id)).scalars().all()
        assert [(r.kind, r.state, r.payload, r.attempts) for r in rows] == [
            ("demo", "queued", {"n": i}, 0) for i in range(3)]  # 'attempts' from its default
        assert all(r.created_at.tzinfo is not None for r in rows)
        first, before = rows[0].id, rows[0].updated_at

    later = datetime.now(UTC) + timedelta(hours=1)
    lease = Prepared(db, update(table).where(
        table.c.id == bindparam("j_id"), table.c.state == "queued"
    ).values(state="leased", run_after=bindparam("after")), table=table)
    with db.transaction() as conn:
        assert lease.run(conn, {"j_id": first, "after": later})[0] == 1
        assert lease.run(conn, {"j_id": first, "after": later})[0] == 0  # no longer queued
    with db.session() as s:
        row = s.get(JobRow, first)
        assert row is not None and row.state == "leased"
        assert abs((row.run_after - later).total_seconds()) < 1e-3
        assert row.updated_at > before  # the column's onupdate, as SQLAlchemy fills it

    find = Prepared(db, select(table.c.id).where(
        table.c.state == bindparam("state")).order_by(table.c.id))
    with db.read() as conn:
        _, found = find.run(conn, {"state": "queued"})
    assert [r[0] for r in found] == [r.id for r in rows[1:]]
    with pytest.raises(KeyError, match="j_id"):
        with db.transaction() as conn:
            lease.run(conn, {"after": later})


def test_a_dbapi_error_is_database_unavailable(db: Database) -> None:
    broken = Prepared(db, select(JobRow.__table__.c.id).where(
        JobRow.__table__.c.id == bindparam("j_id")))
    broken.sql = broken.sql.replace("jobs", "no_such_table")
    with pytest.raises(DatabaseUnavailable, match=f"database {db.dialect} unavailable"):
        with db.transaction() as conn:
            broken.run(conn, {"j_id": 1})
