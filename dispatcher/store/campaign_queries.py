"""The queries of bulk campaigns: the campaign row, its skipped rows, and its messages in bulk.

Every function takes an open Session and does one job; the caller owns the transaction.
A campaign's messages are found through ix_messages_campaign (campaign_id, status, due_at,
campaign_line), so the feeder's "next due rows in file order" and the status counts read
only that campaign's index entries, however many other messages the store holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Sequence

from sqlalchemy import case, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from .queries import insert_once, running_campaigns

from .models import (
    CANCELLED,
    INTERRUPTED,
    LOADING,
    PAUSED,
    PENDING,
    QUEUED,
    SCHEDULED,
    SENDING,
    Campaign,
    CampaignError,
    Message,
)

M = Message.__table__  # type: ignore[attr-defined]
C = Campaign.__table__  # type: ignore[attr-defined]
E = CampaignError.__table__  # type: ignore[attr-defined]
WAITING_STATUSES = (PENDING, SCHEDULED, QUEUED)  # not yet with a worker
UNSETTLED_STATUSES = (PENDING, SCHEDULED, QUEUED, SENDING)  # not yet handed over for good


# --------------------------------------------------------------------------- the campaign row
def add_campaign(session: Session, campaign: Campaign) -> tuple[Campaign, bool]:
    """Insert a campaign; with an idempotency key already used, return (the first one, False)."""
    return insert_once(session, campaign, lambda key: find_by_idempotency_key(session, key))


def find_by_idempotency_key(session: Session, key: str) -> Campaign | None:
    stmt = select(Campaign).where(Campaign.idempotency_key == key)  # type: ignore[arg-type]
    return session.execute(stmt).scalars().first()


def get_campaign(session: Session, campaign_id: str) -> Campaign | None:
    return session.get(Campaign, campaign_id)


def list_campaigns(session: Session, limit: int = 100) -> list[Campaign]:
    stmt = select(Campaign).order_by(C.c.created_at.desc()).limit(limit)
    return list(session.execute(stmt).scalars())


def set_campaign(session: Session, campaign_id: str, expect: Iterable[str] | None, values: dict[str, Any]) -> bool:
    """Update a campaign, compare-and-set on its state when `expect` is given; True when it changed."""
    stmt = update(C).where(C.c.id == campaign_id)
    if expect is not None:
        stmt = stmt.where(C.c.state.in_(list(expect)))
    return session.execute(stmt.values(**values)).rowcount == 1


def active(session: Session) -> list[Any]:
    """Campaigns the feeder looks after: not finished, and past loading (or cancelled during it)."""
    stmt = select(C.c.id, C.c.provider, C.c.state, C.c.not_before, C.c.not_after, C.c.window, C.c.loaded_at,
                  C.c.created_at).where(
        C.c.finished_at.is_(None), C.c.state.in_(["running", "paused", "cancelled"])
    ).order_by(C.c.created_at, C.c.id)
    return list(session.execute(stmt))


# --------------------------------------------------------------------------- its loader
def _loading_by(campaign_id: str, loader: str) -> list[Any]:
    """The loader's fence: the campaign is still being loaded, by this loader (a pause meanwhile keeps loading)."""
    return [C.c.id == campaign_id, C.c.loader == loader, C.c.state.in_([LOADING, PAUSED]), C.c.loaded_at.is_(None)]


def give_up_loading(session: Session, campaign_id: str, loader: str, now: datetime) -> bool:
    """A failed load's campaign becomes `cancelled`, only while `loader` still holds it unloaded:
    never one another load took over or one resumed as loaded (its messages may be going out).
    True when the caller may delete it."""
    stmt = (update(C).where(C.c.id == campaign_id, C.c.loader == loader, C.c.loaded_at.is_(None))
            .values(state=CANCELLED, updated_at=now))
    return session.execute(stmt).rowcount == 1


def add_chunk(session: Session, campaign_id: str, loader: str, total: int, invalid: int, segments: int,
              last_line: int | None, now: datetime) -> bool:
    """Count a chunk into its campaign and beat (updated_at), only while `loader` still loads it;
    False when it does not (cancelled, interrupted, taken over): the caller then stores nothing.

    Run it first in the chunk's transaction: it takes the campaign row's lock, so a cancel or a
    take-over waits for the chunk's commit, or the chunk sees it and is not stored."""
    values: dict[str, Any] = {"total": C.c.total + total, "invalid_count": C.c.invalid_count + invalid,
                              "segments": C.c.segments + segments, "updated_at": now}
    if last_line is not None:
        values["last_line"] = last_line
    return session.execute(update(C).where(*_loading_by(campaign_id, loader)).values(**values)).rowcount == 1


def reclaim(session: Session, campaign_id: str, loader: str, now: datetime) -> bool:
    """`interrupted -> loading` for its own loader, found alive after all (slow, not dead), as
    long as nobody resumed or took over the campaign meanwhile."""
    stmt = update(C).where(C.c.id == campaign_id, C.c.loader == loader, C.c.state == INTERRUPTED,
                           C.c.loaded_at.is_(None)).values(state=LOADING, updated_at=now)
    return session.execute(stmt).rowcount == 1


def finish_loading(session: Session, campaign_id: str, loader: str, now: datetime) -> bool:
    """Every row was read: the campaign runs (unless paused or cancelled meanwhile); False when
    `loader` no longer loads it."""
    fence = [C.c.id == campaign_id, C.c.loader == loader, C.c.loaded_at.is_(None)]
    if session.execute(update(C).where(*fence).values(loaded_at=now, updated_at=now)).rowcount != 1:
        return False
    session.execute(update(C).where(C.c.id == campaign_id, C.c.state.in_([LOADING, INTERRUPTED]))
                    .values(state="running"))
    return True


def take_over(session: Session, campaign_id: str, seen_loader: str | None, loader: str, now: datetime,
              stale_before: datetime) -> int | None:
    """Make `loader` the campaign's loader if its load was interrupted, or its loader
    (`seen_loader`, as read) has not beaten since `stale_before`; returns the last input line
    stored, or None when the campaign was not taken (a live loader, or another take-over first)."""
    stmt = (
        update(C)
        .where(C.c.id == campaign_id, C.c.loaded_at.is_(None), C.c.loader.is_not_distinct_from(seen_loader),
               or_(C.c.state == INTERRUPTED, C.c.state.in_([LOADING, PAUSED]) & (C.c.updated_at < stale_before)))
        .values(loader=loader, updated_at=now, state=case((C.c.state == PAUSED, PAUSED), else_=LOADING))
        .returning(C.c.last_line)
    )
    row = session.execute(stmt).first()
    return None if row is None else int(row[0])


def stale_loads(session: Session, stale_before: datetime) -> list[Any]:
    """Campaigns `loading` whose loader has not beaten since `stale_before`: (id, last_line, total, updated_at)."""
    stmt = select(C.c.id, C.c.last_line, C.c.total, C.c.updated_at).where(
        C.c.state == LOADING, C.c.loaded_at.is_(None), C.c.updated_at < stale_before)
    return list(session.execute(stmt))


def interrupt(session: Session, campaign_id: str, stale_before: datetime, now: datetime) -> bool:
    """`loading -> interrupted` if its loader has still not beaten since `stale_before` (compare-and-set)."""
    stmt = update(C).where(C.c.id == campaign_id, C.c.state == LOADING, C.c.loaded_at.is_(None),
                           C.c.updated_at < stale_before).values(state=INTERRUPTED, updated_at=now)
    return session.execute(stmt).rowcount == 1


# --------------------------------------------------------------------------- skipped rows
def add_errors(session: Session, campaign_id: str, errors: Sequence[tuple[int, str]]) -> None:
    if errors:
        session.execute(insert(E), [{"campaign_id": campaign_id, "line": line, "reason": reason[:1000]}
                                    for line, reason in errors])


def errors(session: Session, campaign_id: str, limit: int) -> list[tuple[int, str]]:
    stmt = select(E.c.line, E.c.reason).where(E.c.campaign_id == campaign_id).order_by(E.c.line, E.c.id).limit(limit)
    return [(row[0], row[1]) for row in session.execute(stmt)]


def delete_campaign(session: Session, campaign_id: str, chunk: int) -> int:
    """Delete up to `chunk` of a campaign's messages; the campaign row and its errors once none are left.

    Returns how many messages were deleted (0: everything is gone)."""
    ids = select(M.c.id).where(M.c.campaign_id == campaign_id).limit(chunk).scalar_subquery()
    deleted = session.execute(delete(M).where(M.c.id.in_(ids))).rowcount
    if deleted == 0:
        session.execute(delete(E).where(E.c.campaign_id == campaign_id))
        session.execute(delete(C).where(C.c.id == campaign_id))
    return deleted


# --------------------------------------------------------------------------- its messages
def counts(session: Session, campaign_id: str) -> dict[str, int]:
    stmt = select(M.c.status, func.count()).where(M.c.campaign_id == campaign_id).group_by(M.c.status)
    return {status: n for status, n in session.execute(stmt)}


def accepted_since(session: Session, campaign_id: str, since: datetime) -> int:
    """How many of the campaign's messages a provider accepted at or after `since`."""
    stmt = select(func.count()).select_from(M).where(M.c.campaign_id == campaign_id, M.c.accepted_at >= since)
    return int(session.execute(stmt).scalar_one())


def first_accepted(session: Session, campaign_id: str) -> datetime | None:
    stmt = select(func.min(M.c.accepted_at)).where(M.c.campaign_id == campaign_id)
    return session.execute(stmt).scalar_one()


def move(session: Session, campaign_id: str, from_statuses: Sequence[str], values: dict[str, Any],
         chunk: int | None = None) -> int:
    """Move the campaign's messages in any of `from_statuses` (at most `chunk` of them); returns how many."""
    cond = [M.c.campaign_id == campaign_id, M.c.status.in_(list(from_statuses))]
    if chunk is None:
        return session.execute(update(M).where(*cond).values(**values)).rowcount
    ids = select(M.c.id).where(*cond).limit(chunk).scalar_subquery()
    return session.execute(update(M).where(M.c.id.in_(ids), M.c.status.in_(list(from_statuses))).values(**values)).rowcount


def back_to_pending(created_at: datetime, now: datetime) -> dict[str, Any]:
    """The values that put a released message back to wait (pause): due since the campaign began,
    so it goes first again, in file order, when the campaign resumes (its window is checked then)."""
    return {"status": PENDING, "due_at": created_at, "updated_at": now}


def has_any(session: Session, campaign_id: str, statuses: Sequence[str]) -> bool:
    stmt = select(M.c.id).where(M.c.campaign_id == campaign_id, M.c.status.in_(list(statuses))).limit(1)
    return session.execute(stmt).first() is not None


def due_pending(session: Session, campaign_id: str, now: datetime, limit: int) -> list[Any]:
    """The campaign's next `limit` pending messages that are due, in file order: rows of (id, to, tz)."""
    stmt = (
        select(M.c.id, M.c.to, M.c.tz)
        .where(M.c.campaign_id == campaign_id, M.c.status == PENDING, M.c.due_at <= now)
        .order_by(M.c.due_at, M.c.campaign_line)
        .limit(limit)
    )
    return list(session.execute(stmt))


def release(session: Session, ids: Sequence[str], now: datetime) -> list[str]:
    """`pending -> queued`, due now, while the campaign runs (compare-and-set: two feeders never
    release one message twice, and a pause committed since the round began releases nothing)."""
    if not ids:
        return []
    stmt = (
        update(M)
        .where(M.c.id.in_(list(ids)), M.c.status == PENDING, M.c.campaign_id.in_(running_campaigns()))
        .values(status=QUEUED, due_at=now, enqueued_at=now, updated_at=now)
        .returning(M.c.id)
    )
    return [row[0] for row in session.execute(stmt)]


def postpone(session: Session, ids: Sequence[str], due_at: datetime, now: datetime) -> None:
    """Pending messages outside their window wait for its next opening."""
    if ids:
        session.execute(update(M).where(M.c.id.in_(list(ids)), M.c.status == PENDING)
                        .values(due_at=due_at, updated_at=now))


def queued_backlog(session: Session, accounts: Sequence[str], before: datetime) -> dict[str, int]:
    """Per account, the queued messages due before `before`: what the broker already holds for it."""
    if not accounts:
        return {}
    stmt = (
        select(M.c.provider, func.count())
        .where(M.c.status == QUEUED, M.c.provider.in_(list(accounts)), or_(M.c.due_at.is_(None), M.c.due_at <= before))
        .group_by(M.c.provider)
    )
    return {account: n for account, n in session.execute(stmt)}

