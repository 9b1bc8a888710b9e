"""Delivery status: poll the providers that have a status endpoint and backfill events.

A beat task runs `poll()`: it takes the accepted messages whose next poll is due (their
`due_at`), asks each provider (concurrently, on the process's event loop), stores each
provider event once (unique per message and event id), and moves the message to the status
of its latest event, both through `intake.apply_events`, which the webhook receiver shares.
Final statuses never move back. Poll cadence backs off with age: the next poll comes a
quarter of the message's age later (at least `poll_first`, at most `poll_max_interval`);
past `poll_max_age` without a final status the message becomes `unknown`. Polls go through
the same global rate limiter as sends, which keep priority (see `_within_limits`). Kinds
with a batched status form (eSMS Africa, up to 100 ids a request) are first checked in
batches, and a message is fetched in full only once the provider has finished with it
(`_check_in_batches`). Kinds without a status endpoint (esimfly, eSIM Access) never enter
this loop: their `accepted` is the last thing the dispatcher can know.

One bad row never stops the poll for the others: messages of an account no longer in the config
are logged with their ids and set aside for `poll_max_interval` (not written off: the account
may come back), and a message whose answer cannot be read or recorded is logged with its id and
polled again later, in a savepoint of its own so the rest of the batch is still recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, TypeVar

import httpx
from sqlalchemy import select

from . import metrics, runtime, transport
from .config import Settings
from .dispatch import outbound
from .intake import apply_events
from .providers.base import Adapter, DeliveryEvent
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
T = TypeVar("T")


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
    if not due:
        return report
    due = _set_aside_unconfigured(due, now, s)
    asked: set[str] = set()
    due = _check_in_batches(due, s, clock, report, asked)
    due, send_at = _within_limits(due, lambda m: m.provider, s)
    asked.update(m.id for m in due)
    report.polled = len(asked)
    if not due:
        return report
    fetched = transport.run(lambda: _fetch_all(due, send_at), s.in_flight)
    now = clock()
    with session_scope(s.database_url) as db:
        for m, events in zip(due, fetched):
            report.requests += 1
            metrics.status_polled(m.provider, events)
            if isinstance(events, BaseException):
                log.info("status poll of %s failed: %s", m.id, type(events).__name__)
                events = []
            _take_alone(db, m, events, now, s, report)
    return report


def _set_aside_unconfigured(due: list[Message], now: datetime, s: Settings) -> list[Message]:
    """The messages whose account still has an adapter; the others are logged and polled much later."""
    problem: dict[str, str | None] = {}  # account -> why it cannot be polled (None: it can)
    kept: list[Message] = []
    aside: dict[str, list[str]] = {}
    for m in due:
        if m.provider not in problem:
            try:
                runtime.adapter_for(m.provider)
                problem[m.provider] = None
            except Exception as exc:  # noqa: BLE001 - an account removed from (or broken in) the config
                problem[m.provider] = str(exc) or type(exc).__name__
        if problem[m.provider] is None:
            kept.append(m)
        else:
            aside.setdefault(m.provider, []).append(m.id)
    if aside:
        later = now + timedelta(seconds=s.poll_max_interval)
        with session_scope(s.database_url) as db:
            for account, ids in aside.items():
                for mid in ids:
                    queries.set_status(db, mid, [ACCEPTED], {"due_at": later})
                log.warning("status poll: account %r is not configured (%s); its messages %s are set aside until %s",
                            account, problem[account], ", ".join(ids), later.isoformat())
    return kept


def _take_alone(db, m: Message, events: list[DeliveryEvent], now: datetime, s: Settings, report: PollReport,
                provider_status: str | None = None) -> None:
    """`_take` in a savepoint of its own: a message that cannot be recorded is logged and polled later."""
    try:
        with db.begin_nested():
            _take(db, m, events, now, s, report, provider_status)
    except Exception as exc:  # noqa: BLE001 - one bad answer never loses the others' events
        log.warning("status poll: could not record the status of %s: %s: %s", m.id, type(exc).__name__, exc)
        with db.begin_nested():
            queries.set_status(db, m.id, [ACCEPTED], {"due_at": next_poll(m.accepted_at or now, now, s)})


def _take(db, m: Message, events: list[DeliveryEvent], now: datetime, s: Settings, report: PollReport,
          provider_status: str | None = None) -> None:
    """Store what one poll learned of one message: its new events, then its status or next poll.

    Events and a final status go through `intake.apply_events` (shared with the webhook
    receiver); `provider_status` is a batched check's word for a message it did not fetch.
    """
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
        values = {"due_at": next_poll(m.accepted_at or now, now, s), "updated_at": now}
        if provider_status is not None and not events:
            values["provider_status"] = provider_status
        queries.set_status(db, m.id, [ACCEPTED], values)


def _check_in_batches(due: list[Message], s: Settings, clock: Callable[[], datetime], report: PollReport,
                      asked: set[str]) -> list[Message]:
    """Ask kinds with a batched status form about up to `status_batch_max` messages per request.

    A message the provider still works on only has its status word noted and its next poll set:
    no event is stored yet. One the provider has finished with (or does not list) is returned, to
    be fetched in full: its whole history arrives then, each event once. So a message costs one
    full request in its life plus its share of the batched checks. Chunks the rate limit has no
    room for stay due. Returns the messages to fetch one by one (every other kind's too).
    """
    batchable: dict[str, list[Message]] = {}
    rest: list[Message] = []
    for m in due:
        if m.provider_ref and runtime.adapter_for(m.provider).status_batch_max > 0:
            batchable.setdefault(m.provider, []).append(m)
        else:
            rest.append(m)
    if not batchable:
        return due
    chunks = []
    for account, messages in batchable.items():
        size = runtime.adapter_for(account).status_batch_max
        chunks += [messages[i:i + size] for i in range(0, len(messages), size)]
    chunks, send_at = _within_limits(chunks, lambda chunk: chunk[0].provider, s)
    if not chunks:
        return rest
    answers = transport.run(lambda: _check_all(chunks, send_at), s.in_flight)
    now = clock()
    with session_scope(s.database_url) as db:
        for chunk, words in zip(chunks, answers):
            report.requests += 1
            asked.update(m.id for m in chunk)
            if isinstance(words, BaseException):
                log.info("batched status check of %d %s messages failed: %s", len(chunk), chunk[0].provider,
                         type(words).__name__)
                for m in chunk:
                    _take_alone(db, m, [], now, s, report)
                continue
            adapter = runtime.adapter_for(chunk[0].provider)
            for m in chunk:
                try:
                    word = words.get(m.provider_ref or "")
                    final = word is None or adapter.is_final_word(word)
                except Exception as exc:  # noqa: BLE001 - an answer about one message that cannot be read
                    log.warning("status check: could not read the word for %s: %s", m.id, type(exc).__name__)
                    final = True  # fetched in full instead
                if final:
                    rest.append(m)
                else:
                    _take_alone(db, m, [], now, s, report, provider_status=word)
    return rest


class StatusCheckFailed(Exception):
    """A batched status check was answered with something other than 200."""


async def _send_at(adapter: Adapter, request: httpx.Request, instant: float) -> httpx.Response:
    """Send one status request at its reserved instant over the process's shared client."""
    wait = instant - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)
    response = await transport.process_loop().client().send(request, auth=adapter.auth() or httpx.USE_CLIENT_DEFAULT)
    await response.aread()
    return response


async def _check_all(chunks: list[list[Message]], send_at: list[float]) -> list[dict[str, str] | BaseException]:
    async def one(chunk: list[Message], instant: float) -> dict[str, str]:
        adapter = runtime.adapter_for(chunk[0].provider)
        request = adapter.build_status_batch_request([m.provider_ref for m in chunk if m.provider_ref])
        response = await _send_at(adapter, request, instant)
        if response.status_code != 200:
            raise StatusCheckFailed(f"HTTP {response.status_code}")
        return adapter.parse_status_batch(response)

    return await asyncio.gather(*(one(c, at) for c, at in zip(chunks, send_at)), return_exceptions=True)


async def _fetch_all(messages: list[Message], send_at: list[float]) -> list[list[DeliveryEvent] | BaseException]:
    async def one(m: Message, instant: float) -> list[DeliveryEvent]:
        adapter = runtime.adapter_for(m.provider)
        msg = outbound(m)
        response = await _send_at(adapter, adapter.build_status_request(msg), instant)
        return adapter.parse_status(response, msg)

    return await asyncio.gather(*(one(m, at) for m, at in zip(messages, send_at)), return_exceptions=True)


def _within_limits(items: list[T], account_of: Callable[[T], str], s: Settings) -> tuple[list[T], list[float]]:
    """The status requests the account's global rate limit has room for, each with its send instant.

    Each item is one request (a message, or a chunk of them for a batched check). Sends keep
    priority: while an account has messages queued or being sent, a poll takes only a slot free
    at this instant (max_wait 0) and never one a send could book; when nothing is waiting to be
    sent, polls may book slots up to one poll interval ahead. What is left out stays due and is
    tried at the next poll tick. Returns (items, monotonic instants), in step.
    """
    by_account: dict[str, list[T]] = {}
    for item in items:
        by_account.setdefault(account_of(item), []).append(item)
    allowed: list[T] = []
    send_at: list[float] = []
    for account, group in by_account.items():
        rate = s.providers[account].rate_limit if account in s.providers else None
        ahead = 0.0 if _sends_waiting(account, s) else s.poll_seconds
        try:
            r = runtime.limiter().reserve(account, rate, len(group), max_wait=ahead)
        except RateLimiterUnavailable:
            log.warning("rate limiter unreachable: status polls of %s wait for the next tick", account)
            continue
        reserved_at = time.monotonic()
        for item, delay in zip(group, r.delays):
            allowed.append(item)
            send_at.append(reserved_at + delay)
    return allowed, send_at


def _sends_waiting(account: str, s: Settings) -> bool:
    with session_scope(s.database_url) as db:
        return db.execute(
            select(Message.id).where(Message.provider == account, Message.status.in_([QUEUED, SENDING])).limit(1)
        ).first() is not None
