"""Bulk insert of messages under idempotency keys, safe against other producers inserting at once.

Rows with a key go in through `INSERT ... ON CONFLICT (idempotency_key) DO NOTHING` (SQLite and
PostgreSQL alike), then one read learns which message owns each key: ours where the insert
took, the other producer's where its row was there first. On PostgreSQL an insert that meets
another transaction's uncommitted row with the same key waits for it to end, so the read that
follows sees the winner. Keyed rows are inserted in key order, so two producers with
overlapping keys take their row locks in the same order and never deadlock.

Rows without a key go in with one executemany, or on PostgreSQL with one COPY: psycopg
pipelines an executemany, but still runs one INSERT per row, which made half of send_many()'s
time for 20,000 messages (docs/throughput.md). The COPY is binary, each value sent in its
column's type as the database reports it, which spares both sides the text form of every
time. The values pass through SQLAlchemy's own bind processing for each column (UTC times,
JSON) either way.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable, Iterator

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session

from .db import driver_cursor
from .models import Message, UTCDateTime

M = Message.__table__  # type: ignore[attr-defined]
READ_CHUNK = 500  # keys per IN (...) read, under SQLite's bound-parameter limit


def insert_keyed(session: Session, rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Insert message rows (dicts of column values); returns (the id each row stands for, rows inserted).

    A row whose key is already stored stands for that message; a key repeated within `rows`
    stands for its first row. Neither is inserted.
    """
    plain = [r for r in rows if not r.get("idempotency_key")]
    first: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = r.get("idempotency_key")
        if key and key not in first:
            first[key] = r
    if plain:
        insert_plain(session, plain)
    owner: dict[str, str] = {}
    if first:
        keyed = [first[k] for k in sorted(first)]
        session.execute(_insert_or_nothing(session), keyed)
        keys = sorted(first)
        for start in range(0, len(keys), READ_CHUNK):
            chunk = keys[start:start + READ_CHUNK]
            owner.update((k, i) for k, i in session.execute(select(M.c.idempotency_key, M.c.id)
                                                             .where(M.c.idempotency_key.in_(chunk))))
    ids = [owner[r["idempotency_key"]] if r.get("idempotency_key") else r["id"] for r in rows]
    inserted = plain + [r for k, r in first.items() if owner[k] == r["id"]]
    return ids, inserted


def _insert_or_nothing(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - the store supports SQLite and PostgreSQL
        raise NotImplementedError(f"no keyed insert for {dialect}")
    return dialect_insert(M).on_conflict_do_nothing(index_elements=[M.c.idempotency_key])


def insert_plain(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert rows naming every column of `messages` (no key to check): one binary COPY on
    PostgreSQL, one executemany of the driver on SQLite, each value through its column's bind
    processor. A column no row gives a value is left out: the database makes it NULL."""
    dialect = session.get_bind().dialect
    every = [c.key for c in M.columns]
    if dialect.name not in ("postgresql", "sqlite") or not all(c in rows[0] for c in every):
        session.execute(insert(M), rows)
        return
    columns = _with_values(rows, every)
    converters = _converters(dialect, columns)
    values = _all_values(rows, columns, converters)
    quote = dialect.identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    if dialect.name == "postgresql":
        sql = f"COPY {quote(M.name)} ({names}) FROM STDIN (FORMAT BINARY)"
        conn = session.connection()
        types = _column_types(conn, columns)
        with driver_cursor(conn, sql) as cursor, cursor.copy(sql) as copy:
            copy.set_types(types)
            for row in values:
                copy.write_row(row)
    else:
        sql = f"INSERT INTO {quote(M.name)} ({names}) VALUES ({', '.join('?' for _ in columns)})"
        with driver_cursor(session.connection(), sql) as cursor:
            cursor.executemany(sql, values)


# Columns that may be left out of an insert when every row has None there: nullable, and no
# default of the database's own (which a left-out column would get instead of NULL).
_MAY_OMIT = frozenset(c.key for c in M.columns if c.nullable and c.server_default is None and not c.primary_key)


def _with_values(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    """`columns` without those that are None in every row (and may be left out). A new message
    leaves half of them None (its claim, its outcome, its campaign); binding fewer values
    halved SQLite's own time for 20,000 rows."""
    first = rows[0]
    unset = [c for c in columns if first[c] is None and c in _MAY_OMIT]
    if not unset:
        return columns
    pick = itemgetter(*unset)
    nothing = pick(first)
    if not all(pick(r) == nothing for r in rows):  # (a tuple of Nones, or None for one column)
        unset = [c for c in unset if all(r[c] is None for r in rows)]
    omitted = set(unset)
    return [c for c in columns if c not in omitted]


def _column_types(conn: Connection, columns: list[str]) -> list[int]:
    """The type oid of each of `columns` of `messages`, as the database has them (a binary COPY
    must send each value in its column's own type: PostgreSQL applies no cast). Read once per
    database URL, and again should a column be missing (a migration since): the table the COPY
    names is the one `messages` resolves to on that URL."""
    key = str(conn.engine.url)
    types = _pg_types.get(key)
    if types is None or not all(c in types for c in columns):
        types = _pg_types[key] = dict(conn.exec_driver_sql(
            "SELECT attname, atttypid::int FROM pg_attribute "
            "WHERE attrelid = %(table)s::regclass AND attnum > 0 AND NOT attisdropped", {"table": M.name}).all())
    return [types[c] for c in columns]


_pg_types: dict[str, dict[str, int]] = {}


def _all_values(rows: list[dict[str, Any]], columns: list[str], converters: list[tuple[int, Any]]) -> Iterator[list[Any]]:
    """Each row's values in column order, as the driver takes them.

    One time often fills several columns of a row (created_at, updated_at, due_at, enqueued_at):
    it is converted once. Empty options, the usual case, are converted once for all rows."""
    pick = itemgetter(*columns)
    empty: dict[int, Any] = {}
    for row in rows:
        out = list(pick(row))
        seen_time: Any = None
        seen_out: Any = None
        for i, process in converters:
            value = out[i]
            if value is None:
                continue
            if process.__class__ is _TimeProcessor:
                if value is not seen_time:
                    seen_time, seen_out = value, process(value)
                out[i] = seen_out
            elif value.__class__ is dict and not value:  # the same JSON for every row without options
                done = empty.get(i)
                if done is None:
                    done = empty[i] = process(value)
                out[i] = done
            else:
                out[i] = process(value)
        yield out


class _TimeProcessor:
    """A UTCDateTime column's bind processor (marked so that `_all_values` may reuse its results)."""

    def __init__(self, process: Callable[[Any], Any]) -> None:
        self.process = process

    def __call__(self, value: Any) -> Any:
        return self.process(value)


_made: dict[tuple[str, tuple[str, ...]], list[tuple[int, Any]]] = {}


def _converters(dialect: Dialect, columns: list[str]) -> list[tuple[int, Any]]:
    """(position in `columns`, bind processor under `dialect`) of the columns that have one."""
    key = (dialect.name, tuple(columns))
    made = _made.get(key)
    if made is None:
        made = []
        for i, c in enumerate(columns):
            process = M.c[c].type._cached_bind_processor(dialect)
            if process is not None:
                made.append((i, _TimeProcessor(process) if isinstance(M.c[c].type, UTCDateTime) else process))
        _made[key] = made
    return made
