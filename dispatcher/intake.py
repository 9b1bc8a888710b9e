"""Delivery-event intake: the one path from provider events into the store.

Both the status poller (`status.poll`) and the webhook receiver (`webhooks`) hand the events
they read for one message to `apply_events`, which

* stores each event once: unique per (message, provider event id), so a replayed webhook, a
  poll of an event a webhook already brought, or a duplicate delivery stores nothing new;
* settles the message when the events name a final status (delivered, failed, expired,
  cancelled): a compare-and-set from `accepted` only, so final statuses never move back and
  an out-of-order event that arrives after the final one changes nothing but its own row;
* otherwise, when new events were stored, keeps `provider_status` on the word of the latest
  stored event (by the time it happened), so a late intermediate event does not overwrite a
  newer one.

What happens to a message with no final status yet (next poll time, giving up) is the
poller's business, not this module's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from .providers.base import DeliveryEvent
from .store import queries
from .store.models import ACCEPTED, CANCELLED, DELIVERED, EXPIRED, FAILED, Event, utcnow

FINAL_BY_EVENT = {"delivered": DELIVERED, "failed": FAILED, "expired": EXPIRED, "cancelled": CANCELLED}


@dataclass(frozen=True)
class Intake:
    """What `apply_events` did for one message."""

    new_events: int  # events stored now (0 for a replay)
    final: str | None  # the final status the events name, if any
    finished: bool  # this call moved the message from `accepted` to `final`


def apply_events(db: Session, message_id: str, events: Iterable[DeliveryEvent], now: datetime,
                 *, settles: bool = True) -> Intake:
    """Store `events` (oldest first, as the provider lists them) once and settle the message.

    `settles=False` stores the events without moving the message (an emnify report about a
    part of a long text other than its last one: the message follows its last part).
    """
    events = list(events)
    rows: dict[str, dict] = {}
    for e in events:  # an event id listed twice in one report: its first entry
        row = event_row(e)
        rows.setdefault(row["event_id"], row)
    new = queries.add_events(db, message_id, list(rows.values()))
    final_event = last_final_event(events) if settles else None
    if final_event is not None:
        final = FINAL_BY_EVENT[final_event.status]
        finished = queries.set_status(db, message_id, [ACCEPTED], {
            "status": final, "finished_at": now, "updated_at": now, "due_at": None,
            "provider_status": fit_word(final_event.provider_status)})
        return Intake(new, final, finished)
    if new and settles:
        latest = _latest_provider_status(db, message_id)
        if latest is not None:
            queries.set_status(db, message_id, [ACCEPTED], {"provider_status": latest, "updated_at": now})
    return Intake(new, None, False)


def last_final_event(events: list[DeliveryEvent]) -> DeliveryEvent | None:
    """The latest event that names a final status (a failure the provider retried is `pending`)."""
    for e in reversed(events):
        if e.status in FINAL_BY_EVENT:
            return e
    return None


def event_row(e: DeliveryEvent) -> dict:
    """The `events` table row of one DeliveryEvent (message_id is added by the query)."""
    return {"event_id": fit_event_id(e.event_id), "status": e.status, "provider_status": fit_word(e.provider_status),
            "occurred_at": e.occurred_at, "recorded_at": utcnow(), "detail": e.detail or {}}


EVENT_ID_MAX, WORD_MAX = 200, 64  # the store's column sizes


def fit_event_id(event_id: str) -> str:
    """A provider's event id as stored: a longer one keeps its start and a hash of the whole, so it stays unique."""
    if len(event_id) <= EVENT_ID_MAX:
        return event_id
    digest = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{event_id[:EVENT_ID_MAX - 65]}#{digest}"


def fit_word(word: str | None) -> str | None:
    """A provider's status word as stored: cut to the column's size."""
    return word if word is None or len(word) <= WORD_MAX else word[:WORD_MAX - 1] + "\u2026"


def _latest_provider_status(db: Session, message_id: str) -> str | None:
    stmt = (select(Event.provider_status).where(Event.message_id == message_id)
            .order_by(Event.occurred_at.desc().nulls_last(), Event.id.desc()).limit(1))  # type: ignore[union-attr]
    row = db.execute(stmt).first()
    return None if row is None else row[0]
