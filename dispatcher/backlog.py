"""What waits in the store, per account: counts by status and the age of the oldest due message.

Read at scrape time by the metrics endpoint and by `dispatcher stats`, so the numbers are the
store's truth whichever process sent what. Both queries go through the (status, due_at) index
and touch only waiting rows: a store with millions of finished messages answers as fast as an
empty one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from .store.models import QUEUED, SCHEDULED, SENDING, Message

WAITING_STATUSES = (SCHEDULED, QUEUED, SENDING)


@dataclass
class Backlog:
    """One account's waiting messages."""

    depth: dict[str, int] = field(default_factory=lambda: {s: 0 for s in WAITING_STATUSES})
    oldest_due_age: float = 0.0  # seconds the oldest due-but-unsent message has been due

    @property
    def due(self) -> int:
        return self.depth[QUEUED]


def read(db: Session, now: datetime) -> dict[str, Backlog]:
    """{account: Backlog} for every account with waiting messages."""
    result: dict[str, Backlog] = {}
    counts = select(Message.provider, Message.status, func.count()).where(
        Message.status.in_(WAITING_STATUSES)).group_by(Message.provider, Message.status)
    for account, status, n in db.execute(counts):
        result.setdefault(account, Backlog()).depth[status] = n
    due_now = or_(Message.status == QUEUED, and_(Message.status == SCHEDULED, Message.due_at <= now))
    for column in (Message.due_at, Message.created_at):  # a queued message with no due time is due since created
        cond = and_(due_now, column.is_not(None)) if column is Message.due_at else and_(due_now, Message.due_at.is_(None))
        oldest = select(Message.provider, func.min(column)).where(cond).group_by(Message.provider)
        for account, since in db.execute(oldest):
            if since is None:
                continue
            if since.tzinfo is None:  # SQLite hands an aggregate back without its type
                since = since.replace(tzinfo=now.tzinfo)
            age = max(0.0, (now - since).total_seconds())
            backlog = result.setdefault(account, Backlog())
            backlog.oldest_due_age = max(backlog.oldest_due_age, age)
    return result
