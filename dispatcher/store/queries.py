"""The queries that move a message through its states, each a compare-and-set on `status`.

Every function takes an open Session and does one job; the caller owns the transaction.
Batch functions take many ids and make one round trip (or one executemany) per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import (
    QUEUED,
    SCHEDULED,
    SENDING,
    Attempt,
    Campaign,
    Event,
    Message,
)

M = Message.__table__  # type: ignore[attr-defined]


def add_message(session: Session, message: Message) -> Message:
    """Insert one message; with an idempotency key already used, return the first one instead."""
    if message.idempotency_key:
        existing = find_by_idempotency_key(session, message.idempotency_key)
        if existing is not None:
            return existing
    try:
        with session.begin_nested():
            session.add(message)
            session.flush()
    except IntegrityError:
        existing = find_by_idempotency_key(session, message.idempotency_key or "")
        if existing is None:
            raise
        return existing
    return message


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
    stmt = (
        select(M.c.id, M.c.provider, M.c.status, M.c.not_after)
        .where(M.c.id.in_(list(ids)), M.c.status.in_([SCHEDULED, QUEUED]))
        .order_by(M.c.created_at, M.c.id)
    )
    return list(session.execute(stmt))


def claim(session: Session, ids: Sequence[str], now: datetime) -> list[Any]:
    """Compare-and-set `queued -> sending` for the ids that are due and not past their not_after;
    returns the claimed rows as they are after the claim (read-only rows with Message's columns).

    A task delivered twice finds its messages already `sending` (or beyond) and claims nothing.
    One statement: the UPDATE returns the rows it claimed.
    """
    if not ids:
        return []
    stmt = (
        update(M)
        .where(
            M.c.id.in_(list(ids)),
            M.c.status == QUEUED,
            or_(M.c.due_at.is_(None), M.c.due_at <= now),
            or_(M.c.not_after.is_(None), M.c.not_after >= now),
            # a campaign's message goes only while its campaign runs: paused / cancelled take hold here
            or_(M.c.campaign_id.is_(None), M.c.campaign_id.in_(select(Campaign.id).where(Campaign.state == "running"))),
        )
        .values(status=SENDING, claimed_at=now, attempts=M.c.attempts + 1, updated_at=now)
        .returning(*M.c)
    )
    return list(session.execute(stmt))


def postpone(session: Session, ids: Sequence[str], now: datetime, due_at: datetime, status: str = QUEUED) -> None:
    """Move queued messages' due time (rate-limited: no attempt made, none counted)."""
    if ids:
        session.execute(
            update(M).where(M.c.id.in_(list(ids)), M.c.status == QUEUED).values(status=status, due_at=due_at, updated_at=now)
        )


def unclaim(session: Session, ids: Sequence[str], now: datetime, due_at: datetime | None) -> None:
    """Give claimed messages back untouched (`sending -> queued`) without counting an attempt."""
    if ids:
        session.execute(
            update(M)
            .where(M.c.id.in_(list(ids)), M.c.status == SENDING)
            .values(status=QUEUED, attempts=M.c.attempts - 1, claimed_at=None, due_at=due_at, updated_at=now)
        )


@dataclass
class Settlement:
    """What one attempt changes: new column values for the message and its attempt row."""

    message_id: str
    values: dict[str, Any]
    attempt: dict[str, Any] | None


_SETTLE_COLUMNS = (
    "status", "attempts", "due_at", "attempt_key", "provider_ref", "provider_status", "segments", "cost",
    "cost_currency", "error_code", "error", "accepted_at", "finished_at", "claimed_at", "updated_at",
)
_RECORD = (
    update(M)
    .where(M.c.id == bindparam("b_id"), M.c.status == SENDING)
    .values({c: bindparam(f"b_{c}") for c in _SETTLE_COLUMNS})
)


def record(session: Session, settlements: Iterable[Settlement]) -> int:
    """Apply settlements of `sending` messages in one executemany; returns rows changed.

    The WHERE status='sending' guard keeps a message settled elsewhere (the reaper, a cancel)
    from being overwritten. An executemany (psycopg 3 pipelines it: one round trip) costs the
    worker a tenth of the CPU of one `UPDATE ... FROM (VALUES ...)` statement holding the whole
    batch, whose 3,000 bound parameters SQLAlchemy and psycopg build, compile and parse anew for
    every batch (9 ms against 50-95 ms per 200 messages, README "Throughput"); and the workers'
    CPU, not the database, is what runs out first on a small machine.
    """
    settlements = list(settlements)
    if not settlements:
        return 0
    params = []
    for s in settlements:
        p = {"b_id": s.message_id}
        for c in _SETTLE_COLUMNS:
            p[f"b_{c}"] = s.values[c]
        params.append(p)
    changed = session.execute(_RECORD, params).rowcount
    attempts = [s.attempt for s in settlements if s.attempt is not None]
    if attempts:  # an executemany too: a multi-row INSERT ... VALUES is compiled anew per batch
        session.execute(insert(Attempt.__table__), attempts)  # type: ignore[attr-defined]
    return changed


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
        .values(status=QUEUED, updated_at=now)
        .returning(M.c.id, M.c.provider)
    )
    return [row[0] for row in session.execute(stmt)]


def stale_sending(session: Session, before: datetime, limit: int) -> list[Message]:
    stmt = select(Message).where(Message.status == SENDING, Message.claimed_at < before).limit(limit)
    return list(session.execute(stmt).scalars())  # type: ignore[attr-defined]


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
