"""The queries that move a message through its states, each a compare-and-set on `status`.

Every function takes an open Session or Core Connection and does one job; the caller owns the
transaction. Batch functions take many ids and make one round trip (or one executemany) per batch.

The send path's statements (`waiting`, `claim`, `mark_started`, `record`) are built once per
dialect and take their ids as one parameter (`= ANY(array)` on PostgreSQL, `json_each` on
SQLite), never as an `IN (...)` expanded into hundreds of bound parameters: SQLAlchemy compiles
each once, and psycopg parses and server-side prepares the same short SQL at every batch
(docs/throughput.md). They find their rows by id alone: the status they check is written so
that no index on it can be chosen (`_status_in`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Sequence

from sqlalchemy import Boolean, Float, Integer, String, TypeDecorator, and_, any_, bindparam, func, insert, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import driver_cursor
from .models import (
    QUEUED,
    SCHEDULED,
    SENDING,
    Attempt,
    Campaign,
    Event,
    Message,
    UTCDateTime,
)

M = Message.__table__  # type: ignore[attr-defined]


def _dialect(db: Any) -> str:
    """The dialect name of a Session or a Connection."""
    bind = getattr(db, "dialect", None)
    return (bind if bind is not None else db.get_bind().dialect).name


def _id_list(db: Any, ids: Sequence[str]) -> tuple[str, Any]:
    """(dialect, the `ids` parameter of a statement built by `_among`)."""
    dialect = _dialect(db)
    return dialect, _id_list_value(dialect, ids)


def _id_list_value(dialect: str, ids: Sequence[str]) -> Any:
    return list(ids) if dialect == "postgresql" else json.dumps(list(ids))


def _among(dialect: str) -> Any:
    """`messages.id` is one of the `ids` parameter, as one bound value."""
    if dialect == "postgresql":
        return M.c.id == any_(bindparam("ids", type_=ARRAY(String)))
    return M.c.id.in_(select(literal_column("value")).select_from(func.json_each(bindparam("ids", type_=String))))


def _status_in(*statuses: str) -> Any:
    """`messages.status` is one of `statuses`, as a check on rows found by id, never a way to find them.

    Beside an id list, a plain `status = 'queued'` let the planner (PostgreSQL's and SQLite's
    alike) read every queued message through the status index and keep the batch's 200: it
    believes a status rare until statistics say otherwise, and a burst of queued messages comes
    before they do. Every claim then cost as much as the whole queue (50 ms of database CPU per
    200 behind 10,000, docs/throughput.md). No index covers `coalesce(status, '')`, which is
    `status` itself since the column is NOT NULL, so the primary key is the only way in.
    """
    checked = func.coalesce(M.c.status, literal_column("''"))
    return or_(*(checked == status for status in statuses))


_statements: dict[tuple[str, str], Any] = {}


def _statement(name: str, dialect: str, build: Callable[[str], Any]) -> Any:
    stmt = _statements.get((name, dialect))
    if stmt is None:
        stmt = _statements[(name, dialect)] = build(dialect)
    return stmt


def add_message(session: Session, message: Message) -> Message:
    """Insert one message; with an idempotency key already used, return the first one instead."""
    return insert_once(session, message, lambda key: find_by_idempotency_key(session, key))[0]


def insert_once(session: Session, row: Any, find: Callable[[str], Any]) -> tuple[Any, bool]:
    """Insert a row with an `idempotency_key`; when the key is taken (before, or by a producer
    racing this one), return (the row holding it, False) instead. (row, True) when inserted."""
    if row.idempotency_key:
        existing = find(row.idempotency_key)
        if existing is not None:
            return existing, False
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        existing = find(row.idempotency_key or "")
        if existing is None:
            raise
        return existing, False
    return row, True


def add_messages(session: Session, rows: list[dict[str, Any]]) -> None:
    """Bulk insert of message rows (dicts of column values), one executemany."""
    if rows:
        session.execute(insert(M), rows)


def find_by_idempotency_key(session: Session, key: str) -> Message | None:
    return session.execute(select(Message).where(Message.idempotency_key == key)).scalars().first()  # type: ignore[attr-defined]


def get_message(session: Session, message_id: str) -> Message | None:
    return session.get(Message, message_id)


def get_events(session: Session, message_id: str) -> list[Event]:
    stmt = select(Event).where(Event.message_id == message_id).order_by(Event.occurred_at, Event.id)
    return list(session.execute(stmt).scalars())  # type: ignore[attr-defined]


def get_attempts(session: Session, message_id: str) -> list[Attempt]:
    stmt = select(Attempt).where(Attempt.message_id == message_id).order_by(Attempt.number)
    return list(session.execute(stmt).scalars())  # type: ignore[attr-defined]


def expire_overdue(session: Session, ids: Sequence[str] | None, now: datetime) -> list[str]:
    """Waiting messages whose not_after has passed become `expired`. Returns their ids."""
    cond = and_(M.c.status.in_([SCHEDULED, QUEUED]), M.c.not_after.is_not(None), M.c.not_after < now)
    if ids is not None:
        cond = and_(cond, M.c.id.in_(list(ids)))
    stmt = (
        update(M)
        .where(cond)
        .values(status="expired", error_code="expired", error="not_after passed before it could be sent",
                finished_at=now, updated_at=now)
        .returning(M.c.id)
    )
    return [row[0] for row in session.execute(stmt)]


def waiting(session: Session, ids: Sequence[str]) -> list[Any]:
    """The waiting (scheduled or queued) messages among `ids`, oldest first, as rows of
    (id, provider, status, not_after): a read before claiming, to know how much room to take."""
    if not ids:
        return []
    dialect, value = _id_list(session, ids)
    return list(session.execute(_statement("waiting", dialect, _waiting), {"ids": value}))


def _waiting(dialect: str) -> Any:
    return (
        select(M.c.id, M.c.provider, M.c.status, M.c.not_after)
        .where(_among(dialect), _status_in(SCHEDULED, QUEUED))
        .order_by(M.c.created_at, M.c.id)
    )


def running_campaigns() -> Any:
    """The ids of running campaigns, as a subquery: only their messages may be claimed or started."""
    return select(Campaign.id).where(Campaign.state == "running")


def claim(session: Session, ids: Sequence[str], now: datetime, token: str, worker: str) -> list[Any]:
    """Compare-and-set `queued -> sending` for the ids that are due and not past their not_after;
    returns the claimed rows as they are after the claim (read-only rows with Message's columns).

    The claim is named (`token`, one per claim statement) and held by `worker` (liveness.py);
    its request has not started (`started_at` is NULL) until `mark_started` says so. A task
    delivered twice finds its messages already `sending` (or beyond) and claims nothing.
    One statement: the UPDATE returns the rows it claimed.
    """
    if not ids:
        return []
    dialect, value = _id_list(session, ids)
    params = {"ids": value, "now": now, "token": token, "worker": worker}
    return list(session.execute(_statement("claim", dialect, _claim), params))


def _claim(dialect: str) -> Any:
    now = bindparam("now", type_=UTCDateTime())
    return (
        update(M)
        .where(
            _among(dialect),
            _status_in(QUEUED),
            or_(M.c.due_at.is_(None), M.c.due_at <= now),
            or_(M.c.not_after.is_(None), M.c.not_after >= now),
            # a campaign's message goes only while its campaign runs: paused / cancelled take hold here
            or_(M.c.campaign_id.is_(None), M.c.campaign_id.in_(running_campaigns())),
        )
        .values(status=SENDING, claimed_at=now, attempts=M.c.attempts + 1, updated_at=now,
                claim_token=bindparam("token", type_=String()), claimed_by=bindparam("worker", type_=String()),
                started_at=None)
        .returning(*M.c)
    )


def mark_started(session: Session, ids: Sequence[str], token: str, now: datetime | None) -> set[str]:
    """Record, just before their requests are written, that these claims may reach the provider
    (`now` None takes a recorded start back: its request was not written after all).

    Compare-and-set on the claim: only the ids returned are still this claim's and may be sent.
    A claim moved meanwhile (the reaper took its worker for dead) is not sent by this worker,
    nor is a campaign's message once its campaign is paused or cancelled (the pause holds up to
    the very start: the caller hands such claims back).
    """
    if not ids:
        return set()
    dialect, value = _id_list(session, ids)
    if now is None:
        stmt = _statement("unmark_started", dialect, _unmark_started)
    else:
        stmt = _statement("mark_started", dialect, _mark_started)
    return {row[0] for row in session.execute(stmt, {"ids": value, "token": token, "now": now})}


def _mark_started(dialect: str) -> Any:
    return (
        update(M)
        .where(_among(dialect), _status_in(SENDING), M.c.claim_token == bindparam("token", type_=String()),
               or_(M.c.campaign_id.is_(None), M.c.campaign_id.in_(running_campaigns())))
        .values(started_at=bindparam("now", type_=UTCDateTime()))
        .returning(M.c.id)
    )


def _unmark_started(dialect: str) -> Any:
    return (
        update(M)
        .where(_among(dialect), _status_in(SENDING), M.c.claim_token == bindparam("token", type_=String()))
        .values(started_at=bindparam("now", type_=UTCDateTime()))
        .returning(M.c.id)
    )


def hand_back(session: Session, ids: Sequence[str], token: str | None, now: datetime,
              due_at: datetime | None, status: str = QUEUED, unstarted_only: bool = False) -> list[str]:
    """Give back claims whose request never started (`sending -> queued`, or `scheduled` for a
    long wait), without counting an attempt. `token` None matches any claim (the reaper's
    lease backstop); `unstarted_only` (the reaper, which does not hold the claim) moves only a
    claim whose start is still not recorded. Returns the ids moved."""
    if not ids:
        return []
    cond = and_(M.c.id.in_(list(ids)), _status_in(SENDING))
    if token is not None:
        cond = and_(cond, M.c.claim_token == token)
    if unstarted_only:
        cond = and_(cond, M.c.started_at.is_(None))
    stmt = (
        update(M).where(cond)
        .values(status=status, attempts=M.c.attempts - 1, claimed_at=None, claim_token=None, claimed_by=None,
                started_at=None, due_at=due_at, updated_at=now, enqueued_at=now)
        .returning(M.c.id)
    )
    return [row[0] for row in session.execute(stmt)]


@dataclass
class Settlement:
    """What one attempt changes: new column values for the message and its attempt row.

    `claim_token` is the claim that made the attempt: the message row changes only while that
    claim still holds it; the attempt row is kept either way (it is what the wire showed).
    """

    message_id: str
    values: dict[str, Any]
    attempt: dict[str, Any] | None
    claim_token: str | None = None


_SETTLE_COLUMNS = (
    "status", "attempts", "due_at", "attempt_key", "key_exposed", "provider_ref", "provider_status", "segments",
    "cost", "cost_currency", "error_code", "error", "accepted_at", "finished_at", "claimed_at", "claimed_by",
    "updated_at",
)
_RECORD = (
    update(M)
    .where(M.c.id == bindparam("b_id"), M.c.status == SENDING, M.c.claim_token == bindparam("b_claim"))
    .values({c: bindparam(f"b_{c}") for c in _SETTLE_COLUMNS})
)


def record(session: Session, settlements: Iterable[Settlement]) -> int:
    """Apply settlements of `sending` messages, attempts included; returns message rows changed.

    The WHERE guard (still `sending`, still the same claim) keeps a message settled elsewhere
    (the reaper, a cancel) or claimed again since from being overwritten by a late result.

    On PostgreSQL the batch travels as one JSON parameter of two statements (`_Batch`); on
    SQLite, whose driver runs an executemany in C, as an executemany on the driver (`_Many`).
    Both cost a fraction of what SQLAlchemy's own handling of a few thousand bound parameters
    cost (docs/throughput.md), and the workers' CPU is what runs out first on a small machine.
    """
    settlements = list(settlements)
    if not settlements:
        return 0
    attempts = [s.attempt for s in settlements if s.attempt is not None]
    if _dialect(session) == "postgresql":
        conn = session.connection() if isinstance(session, Session) else session
        changed = _SETTLE_BATCH.run(conn, ([s.message_id, s.claim_token, *map(s.values.__getitem__, _SETTLE_COLUMNS)]
                                           for s in settlements))
        if attempts:
            _ATTEMPT_BATCH.run(conn, ([a.get(c, _ATTEMPT_DEFAULTS[c]) for c in _ATTEMPT_COLUMNS] for a in attempts))
        return changed
    params = []
    for s in settlements:
        values = s.values
        p = {"b_id": s.message_id, "b_claim": s.claim_token}
        for c in _SETTLE_COLUMNS:
            p["b_" + c] = values[c]
        params.append(p)
    changed = _executemany(session, "record", _RECORD, params)
    if attempts:
        _executemany(session, "attempts", _ATTEMPTS, attempts)
    return changed


class _Batch:
    """One PostgreSQL statement that takes a whole batch of rows as one JSON array of arrays,
    each row's values in the order of `columns`: the client dumps the batch with the json
    module's C encoder, the server parses it once, and one plan does the batch's work (a
    pipelined executemany cost the worker twice the CPU and the server a statement per row).

    `template` holds `{rows}`, a row source with one column per name of `columns`, typed as
    the table's columns are (`text`, `integer`, ...: a value too long for its column is refused
    when it is stored, as it would be from a bound parameter). Times go as ISO text with their
    offset, through UTCDateTime's own bind processor (a naive one is refused).
    """

    def __init__(self, template: str, table: Any, columns: Sequence[str], names: Sequence[str] | None = None) -> None:
        names = names or columns
        fields = ", ".join(f"(r.e->>{i})::{_sql_type(table.c[c].type)} AS {n}"
                           for i, (c, n) in enumerate(zip(columns, names)))
        self.sql = template.format(rows=f"(SELECT {fields} FROM jsonb_array_elements(%s::jsonb) AS r(e))")
        self.times = [i for i, c in enumerate(columns) if isinstance(table.c[c].type, UTCDateTime)]

    def run(self, conn: Any, rows: Iterable[list[Any]]) -> int:
        """Run the statement for `rows` (lists of values in column order); rows changed."""
        times, written, dialect = self.times, {}, conn.dialect  # type: ignore[var-annotated]

        def iso(t: datetime) -> str:
            return _UTC.process_bind_param(t, dialect).isoformat()  # type: ignore[union-attr]

        batch = []
        for row in rows:
            for i in times:
                value = row[i]
                if value is not None:  # a batch's times are mostly one or two instants: each written once
                    row[i] = _once_per_instant(written, value, iso)
            batch.append(row)
        with driver_cursor(conn, self.sql) as cursor:
            cursor.execute(self.sql, (json.dumps(batch, separators=(",", ":")),))
            return cursor.rowcount


def _sql_type(t: Any) -> str:
    """The PostgreSQL type a JSON value is read as, for a column of type `t`."""
    if isinstance(t, TypeDecorator) and not isinstance(t, UTCDateTime):
        t = t.impl_instance  # sqlmodel's AutoString: a String
    for sql_type, name in ((UTCDateTime, "timestamptz"), (Boolean, "boolean"), (Integer, "integer"),
                           (Float, "double precision"), (String, "text")):
        if isinstance(t, sql_type):
            return name
    raise TypeError(f"no JSON reading for a column of type {t!r}")


_UTC = UTCDateTime()  # its bind processor: a naive time refused, an aware one in UTC


def _once_per_instant(written: dict[tuple[datetime, Any], Any], value: datetime, convert: Callable[[datetime], Any]) -> Any:
    """`convert(value)`, computed once per instant of a batch (`written` holds those done)."""
    key = (value, value.utcoffset())  # equal instants of one zone across a DST fold differ
    done = written.get(key)
    return done if done is not None else written.setdefault(key, convert(value))


_ATTEMPT_COLUMNS = ("message_id", "number", "started_at", "http_status", "outcome", "claim_token", "worker",
                    "attempt_key", "request_started", "provider_code", "detail", "latency_ms")
_ATTEMPT_DEFAULTS = {c: (d.arg if (d := Attempt.__table__.c[c].default) is not None else None)  # type: ignore[attr-defined]
                     for c in _ATTEMPT_COLUMNS}
_SETTLE_BATCH = _Batch(
    "UPDATE messages AS m SET " + ", ".join(f"{c} = v.{c}" for c in _SETTLE_COLUMNS)
    + " FROM {rows} AS v WHERE m.id = v.b_id AND coalesce(m.status, '') = 'sending' AND m.claim_token = v.b_claim",
    M, ["id", "claim_token", *_SETTLE_COLUMNS], ["b_id", "b_claim", *_SETTLE_COLUMNS])
_ATTEMPT_BATCH = _Batch(
    "INSERT INTO attempts (" + ", ".join(_ATTEMPT_COLUMNS) + ") SELECT * FROM {rows} AS v",
    Attempt.__table__, _ATTEMPT_COLUMNS)  # type: ignore[attr-defined]


_ATTEMPTS = insert(Attempt.__table__)  # type: ignore[attr-defined]


class _Many:
    """A statement compiled once for a dialect and a set of parameter names, run as the driver's
    own executemany: SQLAlchemy's per-row parameter handling cost the worker as much as the
    driver's (docs/throughput.md). Each value still goes through its type's bind processor,
    a time once per batch (a batch's times are mostly one or two instants)."""

    def __init__(self, stmt: Any, dialect: Any, keys: list[str]) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        # a column left out of `keys` whose default SQLAlchemy computes per row: its own executemany then
        self.direct = not (compiled.insert_prefetch or compiled.update_prefetch)
        self.sql = compiled.string
        self.order = list(compiled.positiontup) if compiled.positional else None
        self.fixed: dict[str, Any] = {}
        self.processors: dict[str, Any] = {}
        self.times: set[str] = set()  # names bound to UTCDateTime columns
        for name, bind in compiled.binds.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if name in keys:
                if process is not None:
                    self.processors[name] = process
                if isinstance(bind.type, UTCDateTime):
                    self.times.add(name)
            else:  # a constant of the statement (`status = 'sending'`)
                value = bind.effective_value
                self.fixed[name] = process(value) if process is not None and value is not None else value

    def rows(self, params: list[dict[str, Any]]) -> list[Any]:
        processors, fixed, order, times = self.processors, self.fixed, self.order, self.times
        written: dict[tuple[datetime, Any], Any] = {}
        out = []
        for p in params:
            row = dict(fixed)
            for name, value in p.items():
                process = processors.get(name)
                if process is None or value is None:
                    row[name] = value
                elif name in times:
                    row[name] = _once_per_instant(written, value, process)
                else:
                    row[name] = process(value)
            out.append(row if order is None else tuple(row[n] for n in order))
        return out


_many: dict[tuple[str, str, tuple[str, ...]], _Many] = {}


def _executemany(db: Any, name: str, stmt: Any, params: list[dict[str, Any]]) -> int:
    """Run `stmt` once per dict of `params` (all with the same keys) on the driver; rows changed."""
    conn = db.connection() if isinstance(db, Session) else db
    keys = tuple(params[0])
    many = _many.get((name, conn.dialect.name, keys))
    if many is None:
        many = _many[(name, conn.dialect.name, keys)] = _Many(stmt, conn.dialect, list(keys))
    if not many.direct:
        return conn.execute(stmt, params).rowcount
    with driver_cursor(conn, many.sql) as cursor:
        cursor.executemany(many.sql, many.rows(params))
        return cursor.rowcount


def due_ids(session: Session, status: str, now: datetime, limit: int) -> list[str]:
    """Ids of messages in `status` whose due time has come, oldest first."""
    stmt = (
        select(M.c.id)
        .where(M.c.status == status, or_(M.c.due_at.is_(None), M.c.due_at <= now))
        .order_by(M.c.due_at)
        .limit(limit)
    )
    return [row[0] for row in session.execute(stmt)]


def release(session: Session, ids: Sequence[str], now: datetime) -> list[str]:
    """`scheduled -> queued` for due messages (compare-and-set: two beats never release one twice)."""
    if not ids:
        return []
    stmt = (
        update(M)
        .where(M.c.id.in_(list(ids)), M.c.status == SCHEDULED, or_(M.c.due_at.is_(None), M.c.due_at <= now))
        .values(status=QUEUED, updated_at=now, enqueued_at=now)
        .returning(M.c.id, M.c.provider)
    )
    return [row[0] for row in session.execute(stmt)]


def claims_of(session: Session, worker: str, limit: int) -> list[Message]:
    """The `sending` claims held by `worker`."""
    stmt = select(Message).where(Message.status == SENDING, Message.claimed_by == worker).limit(limit)
    return list(session.execute(stmt).scalars())  # type: ignore[attr-defined]


def stale_sending(session: Session, before: datetime, limit: int) -> list[Message]:
    """Claims older than the lease, whoever holds them (a backstop behind the heartbeats)."""
    stmt = select(Message).where(Message.status == SENDING, Message.claimed_at < before).limit(limit)
    return list(session.execute(stmt).scalars())  # type: ignore[attr-defined]


def lost_queued(session: Session, published_before: datetime, due_before: datetime | None, limit: int
                ) -> list[tuple[str, datetime | None]]:
    """Queued messages whose last task was published before `published_before` (and, with
    `due_before`, that were due before it): their task may be lost. Returns (id, due_at) pairs;
    stamping them (`stamp_enqueued`) when they are published again takes them off this list."""
    cond = and_(M.c.status == QUEUED, or_(M.c.enqueued_at.is_(None), M.c.enqueued_at < published_before))
    if due_before is not None:
        cond = and_(cond, or_(M.c.due_at.is_(None), M.c.due_at < due_before))
    stmt = select(M.c.id, M.c.due_at).where(cond).order_by(M.c.due_at).limit(limit)
    return [(row[0], row[1]) for row in session.execute(stmt)]


def stamp_enqueued(session: Session, ids: Sequence[str], now: datetime) -> None:
    """Remember when a task for these messages was last published (the lost-task sweep reads it)."""
    if ids:
        session.execute(update(M).where(M.c.id.in_(list(ids))).values(enqueued_at=now))


def set_claim(session: Session, message_id: str, token: str | None, values: dict[str, Any]) -> bool:
    """Compare-and-set one `sending` message still held by the claim `token`; True when it moved."""
    held = M.c.claim_token.is_(None) if token is None else M.c.claim_token == token
    stmt = update(M).where(M.c.id == message_id, M.c.status == SENDING, held).values(**values)
    return session.execute(stmt).rowcount == 1


def add_attempt(session: Session, attempt: dict[str, Any]) -> None:
    session.execute(insert(Attempt.__table__), [attempt])  # type: ignore[attr-defined]


def set_status(session: Session, message_id: str, expect: Iterable[str], values: dict[str, Any]) -> bool:
    """Compare-and-set one message from any of `expect` statuses; True when it moved."""
    stmt = update(M).where(M.c.id == message_id, M.c.status.in_(list(expect))).values(**values)
    return session.execute(stmt).rowcount == 1


def add_events(session: Session, message_id: str, events: list[dict[str, Any]]) -> int:
    """Store delivery events not seen before (by provider event id); returns how many were new."""
    if not events:
        return 0
    seen = {
        row[0]
        for row in session.execute(
            select(Event.event_id).where(Event.message_id == message_id, Event.event_id.in_([e["event_id"] for e in events]))  # type: ignore[attr-defined]
        )
    }
    fresh = [dict(e, message_id=message_id) for e in events if e["event_id"] not in seen]
    if fresh:
        session.execute(insert(Event.__table__), fresh)  # type: ignore[attr-defined]
    return len(fresh)
