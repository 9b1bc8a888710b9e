"""Engines and schema: one engine per database URL and process, Alembic to bring it up to date.

SQLite is made safe for several worker processes writing at once: WAL journal, a generous
busy timeout, and every transaction opened with BEGIN IMMEDIATE so that two writers queue
on the lock instead of deadlocking on an upgrade from read to write.

A pooled PostgreSQL connection is pinged before use only when it has sat idle in the pool for
PING_IDLE seconds (`pool_pre_ping` pinged at every checkout: one more round trip for every
statement of the send path). A connection that died while in use fails its statement; SQLAlchemy
then drops every connection the pool held at that moment, and the callers already retry a
failed store step (docs/failures.md).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import event, exc, inspect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

MIGRATIONS = Path(__file__).parent / "migrations"
_engines: dict[tuple[str, int], Engine] = {}
_upgraded: set[tuple[str, int]] = set()
_lock = threading.Lock()
_migrating = threading.Lock()
PING_IDLE = 5.0  # seconds a pooled PostgreSQL connection may sit unused before it is pinged at checkout


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3, which is what we install."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def is_sqlite(url: str) -> bool:
    return normalize_url(url).startswith("sqlite")


def get_engine(url: str) -> Engine:
    """The process's engine for `url` (a forked worker gets its own, never its parent's)."""
    url = normalize_url(url)
    key = (url, os.getpid())
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _make_engine(url)
            _engines[key] = engine
    return engine


def _make_engine(url: str) -> Engine:
    if is_sqlite(url):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20, max_overflow=20)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # Enough pooled connections for every worker thread plus the threads recording outcomes:
    # an overflow connection is closed when returned, and a new PostgreSQL backend per batch
    # halved throughput (bench/throughput.py).
    engine = create_engine(url, pool_size=32, max_overflow=16)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a connection at checkout if it has been idle for PING_IDLE s; a dead one is replaced."""

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record):  # type: ignore[no-untyped-def]
        if record is not None:
            record.info["returned"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn, record, _proxy):  # type: ignore[no-untyped-def]
        if time.monotonic() - record.info.get("returned", 0.0) < PING_IDLE:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as error:  # noqa: BLE001 - any failure: the pool connects again
            raise exc.DisconnectionError() from error
        if alive is False:
            raise exc.DisconnectionError()
        record.info["returned"] = time.monotonic()


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = Session(get_engine(url), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def driver_cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """The driver's own cursor on `conn` (for COPY and executemany without SQLAlchemy's per-row
    work), closed after use. Its errors are raised as SQLAlchemy would raise them, so callers
    still tell the store being busy or away (OperationalError) from a value it refuses."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield cursor
    except dbapi.Error as error:
        raise exc.DBAPIError.instance(statement, None, error, dbapi.Error, dialect=conn.dialect) from error
    finally:
        cursor.close()


@contextmanager
def connection_scope(url: str, *, autocommit: bool = False) -> Iterator[Connection]:
    """A Core connection for the send path's statements, without an ORM session.

    By default one transaction, committed on success and rolled back on error. With
    `autocommit` on PostgreSQL, each statement commits on its own: a single-statement write is
    one round trip instead of three (BEGIN, the statement, COMMIT); use it only where every
    statement is a whole step by itself. SQLite always runs a transaction (BEGIN IMMEDIATE).
    """
    engine = get_engine(url)
    if autocommit and engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")
        return
    with engine.begin() as conn:
        yield conn


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["url"] = normalize_url(url)
    return cfg


def upgrade(url: str) -> None:
    """Apply every migration not yet applied (`dispatcher db upgrade`)."""
    from alembic import command

    url = normalize_url(url)
    # Alembic keeps its running context in module globals: two threads of one process must never
    # migrate at once, even two different databases. The file lock covers other processes.
    with _migrating, _file_lock(url):
        command.upgrade(alembic_config(url), "head")
    _upgraded.add((url, os.getpid()))


def ensure_schema(url: str) -> None:
    """Bring the embedded SQLite database up to date on first use; check others are migrated."""
    url = normalize_url(url)
    if (url, os.getpid()) in _upgraded:
        return
    if is_sqlite(url):
        upgrade(url)
        return
    if not inspect(get_engine(url)).has_table("alembic_version"):
        from ..errors import ConfigError

        raise ConfigError("the database has no dispatcher schema yet: run `dispatcher db upgrade`")
    _upgraded.add((url, os.getpid()))


@contextmanager
def _file_lock(url: str) -> Iterator[None]:
    """Serialize migrations of one SQLite file across processes (a worker pool starting at once)."""
    if not is_sqlite(url):
        yield
        return
    database = make_url(url).database
    if not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_suffix(Path(database).suffix + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def dispose_all() -> None:
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _upgraded.clear()
