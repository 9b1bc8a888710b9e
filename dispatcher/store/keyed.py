"""Bulk insert of messages under idempotency keys, safe against other producers inserting at once.

Rows with a key go in through `INSERT ... ON CONFLICT (idempotency_key) DO NOTHING` (SQLite and
PostgreSQL alike), then one read learns which message owns each key: ours where the insert
took, the other producer's where its row was there first. On PostgreSQL an insert that meets
another transaction's uncommitted row with the same key waits for it to end, so the read that
follows sees the winner. Keyed rows are inserted in key order, so two producers with
overlapping keys take their row locks in the same order and never deadlock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from .models import Message

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
        session.execute(insert(M), plain)
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
