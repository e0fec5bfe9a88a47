"""One engine per process and a ``session()`` context manager that commits or rolls back.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a committed
transaction survives a power cut as well as a kill -9; PostgreSQL is reached through psycopg 3.
Driver errors are translated to :class:`~storage.errors.DatabaseUnavailable` at this boundary.

On SQLite every :meth:`Database.session` takes the write lock up front (``BEGIN IMMEDIATE``);
:meth:`Database.read` is for short lookups that must not queue behind (or hold up) writers:
in WAL mode a deferred read transaction sees the last commit and takes no write lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import FromClause, bindparam, create_engine, event, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as SQLAlchemyIntegrityError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from storage.errors import DatabaseUnavailable, NotMigrated
from storage.turn import WriteTurn

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_READ_ONLY = "fednode_read_only"


class Database:
    """The database of one node process."""

    def __init__(
        self, url: str, *, busy_timeout_ms: int = 10000, pool_size: int = 5, echo: bool = False
    ) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        # SQLite: the node's writers take turns through a lock file (storage.turn).
        self.turn: WriteTurn | None = None
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                _private_sqlite_file(Path(parsed.database))
                self.turn = WriteTurn(Path(parsed.database), timeout_seconds=busy_timeout_ms / 1000)
            kwargs["connect_args"] = {"timeout": busy_timeout_ms / 1000, "isolation_level": None}
        else:
            kwargs.update(
                pool_size=pool_size,
                pool_pre_ping=True,
                connect_args={"connect_timeout": 5},
            )
        self.engine: Engine = create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine, busy_timeout_ms)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._prepared: dict[Any, Prepared] = {}

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    def write_turn(self, *, priority: bool = False) -> AbstractContextManager[None]:
        """Hold the node-wide write turn of a SQLite file (:mod:`storage.turn`); on
        PostgreSQL (row locks, no single writer) it is a no-op. :meth:`session` and
        :meth:`transaction` take it themselves; *priority* is for the C-STORE path."""
        return nullcontext() if self.turn is None else self.turn.hold(priority=priority)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.write_turn(), self._translated():
            with self._sessions() as session, session.begin():
                yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in one write transaction, as :meth:`session` without the ORM
        (for the C-STORE path, where the session's own bookkeeping is measurable)."""
        with self.write_turn(), self._translated():
            with self.engine.begin() as conn:
                yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyIntegrityError:
            raise  # a constraint the caller must handle, not an outage
        except DBAPIError as exc:
            # Connection refused or lost, locked, read-only, disk full, schema missing: the
            # database cannot keep what it is given. Callers answer "out of resources".
            raise DatabaseUnavailable(
                f"database {self.dialect} unavailable: {type(exc.orig).__name__}"
            ) from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads only, in a transaction that is rolled back at the end.

        On SQLite the transaction is deferred (plain ``BEGIN``), so it neither waits for nor
        blocks writers; on PostgreSQL it is an ordinary transaction.
        """
        try:
            with self.engine.connect() as conn:
                yield conn.execution_options(**{_READ_ONLY: True})
        except DBAPIError as exc:
            raise DatabaseUnavailable(
                f"database {self.dialect} unavailable: {type(exc.orig).__name__}"
            ) from exc

    def check_reachable(self) -> None:
        """Open a connection, or raise :class:`DatabaseUnavailable`."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except SQLAlchemyError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: SQLAlchemyError) -> DatabaseUnavailable:
        """The error for a database that cannot be reached: where it was looked for (never
        the password) and the driver's reason."""
        parsed = make_url(self.url)
        if self.dialect == "sqlite":
            where = f"at {parsed.database}"
        else:
            where = f"at {parsed.host or 'the local socket'}:{parsed.port or 5432}"
            if parsed.database:
                where += f", database {parsed.database}"
        orig = getattr(exc, "orig", None) or exc
        lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
        reason = lines[0] if lines else type(orig).__name__
        return DatabaseUnavailable(
            f"cannot reach the {self.dialect} database {where}: {reason[:300]}"
        )

    def warm_up(self) -> None:
        """Do now what the first transaction would otherwise pay for while a peer waits: the
        ORM's mapper configuration and a pooled connection. A database that is down is not an
        error here (the callers answer for it when they need it)."""
        configure_mappers()
        try:
            self.check_reachable()
        except DatabaseUnavailable as exc:
            logger.warning("%s", exc)

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (``None`` when unmigrated)."""
        from alembic.runtime.migration import MigrationContext

        try:
            with self.engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except SQLAlchemyError as exc:
            raise self._unreachable(exc) from exc

    def head_revision(self) -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(self._alembic_config()).get_current_head()

    def check_migrated(self) -> None:
        """Raise :class:`NotMigrated` unless the schema is at the newest revision."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise NotMigrated(
                f"the database is at revision {current or '(none)'}, the node needs {head}; "
                "fix: run `fednode db upgrade`"
            )

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to *revision*."""
        self._migrate("upgrade", revision)

    def downgrade(self, revision: str) -> None:
        """Run the Alembic migrations down to *revision* (a migration may refuse: it raises
        with the reason)."""
        self._migrate("downgrade", revision)

    def _migrate(self, direction: str, revision: str) -> None:
        from alembic import command

        try:
            getattr(command, direction)(self._alembic_config(), revision)
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(
                f"cannot migrate the {self.dialect} database: {type(exc).__name__}"
            ) from exc

    def _alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upsert(
        self,
        conn: Connection | Session,
        table: Any,
        values: Mapping[str, Any],
        *,
        key: str,
        update: Mapping[str, Any] | None = None,
    ) -> None:
        """``INSERT … ON CONFLICT (key) DO NOTHING`` (or ``DO UPDATE SET`` *update*) in the
        transaction of *conn*, in this database's dialect.

        The one place the node writes an insert that depends on the dialect (SQLite and
        PostgreSQL both spell it ``ON CONFLICT``; SQLAlchemy has it per dialect only).
        *table* is a mapped class or a table; *key* is the unique column the conflict is on.
        """
        conn.execute(_conflict_insert(self, table, values, key, update))

    def upsert_many(
        self,
        conn: Connection | Session,
        table: Any,
        rows: Sequence[Mapping[str, Any]],
        *,
        key: str,
        update_from_row: Sequence[str] = (),
        update: Mapping[str, Any] | None = None,
    ) -> None:
        """:meth:`upsert` of several *rows* in one ``executemany``.

        On a conflict on *key* nothing happens, unless *update_from_row* names columns that
        take the value of the row that was to be inserted (``excluded.<column>``) and/or
        *update* gives columns fixed values.
        """
        if not rows:
            return
        if update:  # fixed values: built for this call
            conn.execute(self._upsert_stmt(table, key, update_from_row, update),
                         [dict(row) for row in rows])
            return
        columns = tuple(rows[0])

        def build() -> tuple[Any, FromClause]:
            stmt = self._upsert_stmt(table, key, update_from_row, None).values(
                {name: bindparam(name) for name in columns})
            return stmt, inspect(table).local_table if hasattr(table, "__mapper__") else table

        self.prepared(("upsert", table, key, tuple(update_from_row), columns), build
                      ).run_many(conn, rows)

    def _upsert_stmt(self, table: Any, key: str, update_from_row: Sequence[str],
                     update: Mapping[str, Any] | None) -> Any:
        stmt = (postgresql if self.is_postgresql else sqlite).insert(table)
        set_ = {column: stmt.excluded[column] for column in update_from_row}
        set_.update(update or {})
        if set_:
            return stmt.on_conflict_do_update(index_elements=[key], set_=set_)
        return stmt.on_conflict_do_nothing(index_elements=[key])

    def prepared(self, key: Any, build: Any) -> Prepared:
        """The :class:`Prepared` statement cached under *key*, built by ``build()`` (a
        SQLAlchemy statement, or a ``(statement, table)`` pair) the first time."""
        prepared = self._prepared.get(key)
        if prepared is None:
            built = build()
            stmt, table = built if isinstance(built, tuple) else (built, None)
            prepared = self._prepared[key] = Prepared(self, stmt, table=table)
        return prepared

    def table_names(self) -> list[str]:
        return inspect(self.engine).get_table_names()

    def dispose(self) -> None:
        self.engine.dispose()
        if self.turn is not None:
            self.turn.close()


class Prepared:
    """A SQLAlchemy statement compiled once for the database's dialect and run on the DBAPI
    cursor of a transaction opened with :meth:`Database.transaction` or
    :meth:`Database.session`.

    For the node's hot paths (the C-STORE commit, a worker's batch), where SQLAlchemy's
    per-execution machinery (statement construction, cache lookup, parameter processing,
    result wrapping) cost more than the SQL itself, and on SQLite every millisecond of it is
    spent holding the write lock. Values go through each parameter's own type (its bind
    processor), so what is stored is exactly what SQLAlchemy would store. Parameters are
    the statement's ``bindparam`` names; a parameter the caller does not give takes the
    value the statement was built with, or the Python-side default of the column of
    *table* it fills (an insert's ``created_at``, an update's ``onupdate`` ``updated_at``).
    Statements with expanding (``IN``) parameters are not supported: run one statement per
    row instead.
    """

    def __init__(self, db: Database, stmt: Any, *, table: FromClause | None = None) -> None:
        dialect = db.engine.dialect
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self._positional = compiled.positional
        names = compiled.positiontup if compiled.positional else None
        self._order: tuple[str, ...] = tuple(names or compiled.params)
        self._process: dict[str, Any] = {}
        self._fixed: dict[str, Any] = {}
        self._defaults: dict[str, Any] = {}
        for name in self._order:
            bind = compiled.binds[name]
            self._process[name] = bind.type.dialect_impl(dialect).bind_processor(dialect)
            column = table.c.get(name) if table is not None else None
            default = None
            if column is not None:  # what SQLAlchemy fills in: onupdate in an UPDATE
                default = column.onupdate if compiled.isupdate else column.default
            if default is not None and (default.is_scalar or default.is_callable):
                self._defaults[name] = default
            elif not bind.required:
                self._fixed[name] = bind.effective_value
        self.returns_rows = bool(stmt.is_select or compiled.effective_returning)
        self._dialect = db.dialect
        self._errors = dialect.loaded_dbapi.Error
        self._integrity = dialect.loaded_dbapi.IntegrityError

    def _args(self, values: Mapping[str, Any]) -> Any:
        params = {}
        for name, process in self._process.items():
            if name in values:
                value = values[name]
            elif name in self._defaults:
                default = self._defaults[name]
                value = default.arg(None) if default.is_callable else default.arg
            elif name in self._fixed:
                value = self._fixed[name]
            else:
                raise KeyError(f"no value for parameter {name!r} of a prepared statement")
            params[name] = process(value) if process is not None else value
        return tuple(params[n] for n in self._order) if self._positional else params

    def run(self, conn: Connection | Session, values: Mapping[str, Any] | None = None
            ) -> tuple[int, list[tuple[Any, ...]]]:
        """Execute once with *values*; return the row count and the rows it returned, as
        the driver returns them (no result processing: select plain columns)."""
        args = self._args(values or {})
        with self._cursor(conn) as cursor:
            cursor.execute(self.sql, args)
            rows = [tuple(r) for r in cursor.fetchall()] if self.returns_rows else []
            return cursor.rowcount, rows

    def run_many(self, conn: Connection | Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """Execute once per row of *rows* (one ``executemany``)."""
        if not rows:
            return
        args = [self._args(row) for row in rows]
        with self._cursor(conn) as cursor:
            cursor.executemany(self.sql, args)

    @contextmanager
    def _cursor(self, conn: Connection | Session) -> Iterator[Any]:
        if isinstance(conn, Session):
            conn = conn.connection()
        try:
            cursor = conn.connection.cursor()
            try:
                yield cursor
            finally:
                cursor.close()
        except self._integrity:
            raise
        except self._errors as exc:
            raise DatabaseUnavailable(
                f"database {self._dialect} unavailable: {type(exc).__name__}"
            ) from exc


class PreparedInsert(Prepared):
    """``INSERT … ON CONFLICT DO NOTHING RETURNING id`` into *table*, prepared
    (:class:`Prepared`) for the C-STORE path."""

    def __init__(
        self, db: Database, table: FromClause, columns: Sequence[str], conflict: str
    ) -> None:
        stmt = _conflict_insert(
            db, table, {name: bindparam(name) for name in columns}, conflict, None
        ).returning(table.c.id)
        super().__init__(db, stmt, table=table)
        missing = [n for n in self._order
                   if n not in columns and n not in self._defaults]
        if missing:
            raise ValueError(f"column {missing[0]} needs a value or a Python-side default")

    def __call__(self, conn: Connection | Session, values: Mapping[str, Any]) -> int | None:
        """Insert *values*; return the new id, ``None`` on a conflict."""
        _, rows = self.run(conn, values)
        return None if not rows else int(rows[0][0])


def _conflict_insert(
    db: Database,
    table: Any,
    values: Mapping[str, Any],
    key: str,
    update: Mapping[str, Any] | None,
) -> Any:
    """The dialect's ``INSERT … ON CONFLICT (key) DO NOTHING | DO UPDATE SET update``."""
    stmt = (postgresql if db.is_postgresql else sqlite).insert(table).values(dict(values))
    if update:
        return stmt.on_conflict_do_update(index_elements=[key], set_=dict(update))
    return stmt.on_conflict_do_nothing(index_elements=[key])


def _private_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 (owner only) before SQLite opens it, and tighten an existing
    one and its ``-wal``/``-shm`` files: SQLite creates those with the database file's mode,
    and the process umask (often 022) would otherwise leave them world-readable. They hold
    pseudonymous keys and audit records, not PHI, but nothing of the node's is for others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        logger.warning("cannot create %s: %s", path, exc.strerror)
        return
    for name in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = name.stat().st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("cannot restrict the permissions of %s: %s", name, exc.strerror)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # BEGIN IMMEDIATE takes the write lock up front, so two writers queue on busy_timeout
        # instead of failing with "database is locked" when one upgrades a read lock.
        # Database.read() connections never write: a deferred BEGIN takes no write lock.
        if conn.get_execution_options().get(_READ_ONLY):
            conn.exec_driver_sql("BEGIN")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
