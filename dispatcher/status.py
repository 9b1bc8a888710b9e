"""Delivery status: poll the providers that have a status endpoint and backfill events.

A beat task runs `poll()`: it takes the accepted messages whose next poll is due (their
`due_at`), asks each provider (concurrently, on the process's event loop), stores each
provider event once (unique per message and event id), and moves the message to the status
of its latest event, both through `intake.apply_events`, which the webhook receiver shares.
Final statuses never move back. Poll cadence backs off with age: the next poll comes a
quarter of the message's age later (at least `poll_first`, at most `poll_max_interval`);
past `poll_max_age` without a final status the message becomes `unknown`. Polls go through
the same global rate limiter as sends, which keep priority (see `_within_limits`). Kinds
without a status endpoint (esimfly, eSIM Access) never enter this loop:
their `accepted` is the last thing the dispatcher can know.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

import httpx
from sqlalchemy import select

from . import runtime, transport
from .config import Settings
from .dispatch import outbound
from .intake import apply_events, event_row, final_status
from .providers.base import DeliveryEvent
from .ratelimit import RateLimiterUnavailable
from .store import queries
from .store.db import ensure_schema, session_scope
from .store.models import (
    ACCEPTED,
    QUEUED,
    SENDING,
    UNKNOWN,
    Message,
    utcnow,
)

log = logging.getLogger("dispatcher.status")
BATCH = 500
# Storing events and settling the message is intake.apply_events, shared with the webhook receiver.
_final_status, _row = final_status, event_row


@dataclass
class PollReport:
    polled: int = 0
    requests: int = 0
    new_events: int = 0
    finished: int = 0
    gave_up: int = 0


def next_poll(accepted_at: datetime, now: datetime, s: Settings) -> datetime:
    age = (now - accepted_at).total_seconds()
    return now + timedelta(seconds=min(max(age / 4.0, s.poll_first), s.poll_max_interval))


def poll(*, settings: Settings | None = None, clock: Callable[[], datetime] = utcnow) -> PollReport:
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    now = clock()
    report = PollReport()
    with session_scope(s.database_url) as db:
        due = list(db.execute(
            select(Message).where(Message.status == ACCEPTED, Message.due_at.is_not(None), Message.due_at <= now)
            .order_by(Message.due_at).limit(BATCH)
        ).scalars())
    due, send_at = _within_limits(due, s)
    if not due:
        return report
    report.polled = len(due)
    fetched = transport.run(lambda: _fetch_all(due, send_at), s.in_flight)
    now = clock()
    with session_scope(s.database_url) as db:
        for m, events in zip(due, fetched):
            report.requests += 1
            if isinstance(events, BaseException):
                log.info("status poll of %s failed: %s", m.id, type(events).__name__)
                events = []
            intake = apply_events(db, m.id, events, now)
            report.new_events += intake.new_events
            if intake.final is not None:
                report.finished += int(intake.finished)
            elif m.accepted_at and (now - m.accepted_at).total_seconds() > s.poll_max_age:
                queries.set_status(db, m.id, [ACCEPTED], {
                    "status": UNKNOWN, "finished_at": now, "updated_at": now, "due_at": None,
                    "error_code": "no_final_status",
                    "error": f"no final delivery status after {s.poll_max_age / 3600:g} h of polling"})
                report.gave_up += 1
            else:
                queries.set_status(db, m.id, [ACCEPTED], {"due_at": next_poll(m.accepted_at or now, now, s),
                                                          "updated_at": now})
    return report


async def _fetch_all(messages: list[Message], send_at: dict[str, float]) -> list[list[DeliveryEvent] | BaseException]:
    loop = transport.process_loop()
    client = loop.client()

    async def one(m: Message) -> list[DeliveryEvent]:
        adapter = runtime.adapter_for(m.provider)
        msg = outbound(m)
        wait = send_at.get(m.id, 0.0) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        response = await client.send(adapter.build_status_request(msg), auth=adapter.auth() or httpx.USE_CLIENT_DEFAULT)
        await response.aread()
        return adapter.parse_status(response, msg)

    return await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)


def _within_limits(due: list[Message], s: Settings) -> tuple[list[Message], dict[str, float]]:
    """The polls the account's global rate limit has room for, each with its send instant.

    Sends keep priority: while an account has messages queued or being sent, a poll takes only
    a slot free at this instant (max_wait 0) and never one a send could book; when nothing is
    waiting to be sent, polls may book slots up to one poll interval ahead. What is left out
    stays due and is tried at the next poll tick. Returns (messages, {id: monotonic instant}).
    """
    by_account: dict[str, list[Message]] = {}
    for m in due:
        by_account.setdefault(m.provider, []).append(m)
    allowed: list[Message] = []
    send_at: dict[str, float] = {}
    for account, messages in by_account.items():
        rate = s.providers[account].rate_limit if account in s.providers else None
        ahead = 0.0 if _sends_waiting(account, s) else s.poll_seconds
        try:
            r = runtime.limiter().reserve(account, rate, len(messages), max_wait=ahead)
        except RateLimiterUnavailable:
            log.warning("rate limiter unreachable: status polls of %s wait for the next tick", account)
            continue
        reserved_at = time.monotonic()
        for m, delay in zip(messages, r.delays):
            allowed.append(m)
            send_at[m.id] = reserved_at + delay
    return allowed, send_at


def _sends_waiting(account: str, s: Settings) -> bool:
    with session_scope(s.database_url) as db:
        return db.execute(
            select(Message.id).where(Message.provider == account, Message.status.in_([QUEUED, SENDING])).limit(1)
        ).first() is not None
