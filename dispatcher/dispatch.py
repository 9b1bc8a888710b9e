"""The send loop of a worker: claim -> admit -> send -> record, for a batch of message ids.

`admit` asks the global rate limiter (ratelimit/) for a send instant per message; what cannot
go within `throttle_wait` is put back in the queue for when its turn comes, holding no worker
slot and using no attempt. A provider's 429 / rate headers pause the account for every worker.

Every outcome of an attempt is settled in one place, `settle()`:

    Accepted            -> accepted (provider_ref, segments, cost kept)
    Rejected            -> rejected (the provider's code and message kept)
    RetryLater          -> queued again at a backoff time (or the provider's retry time),
                           held in the store as `scheduled` when that is far off,
                           failed when the attempts are used up, expired past not_after
    an exception        -> unknown: the request may have gone; never re-sent blindly

The claim (`queued -> sending`) is committed before any HTTP request, so a task delivered
twice sends once. The HTTP requests of a batch run concurrently on the process's event
loop (transport.py); a batch's claim is one UPDATE ... RETURNING, its record one executemany.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Sequence

from . import metrics, runtime, transport
from .config import Settings
from .errors import BrokerUnavailable
from .logs import about
from .ratelimit import RateLimiterUnavailable
from .providers.base import Accepted, OutboundMessage, Rejected, RetryLater, SendResult
from .redact import mask
from .retry import backoff
from .store import queries
from .store.db import ensure_schema, session_scope
from .store.models import ACCEPTED, EXPIRED, FAILED, QUEUED, REJECTED, SCHEDULED, UNKNOWN, Message, utcnow

log = logging.getLogger("dispatcher.dispatch")
REDIS_DOWN_WAIT = 2.0  # seconds before a batch retries when the limiter's Redis is unreachable
BUSY_WAIT_MAX = 2.0  # seconds a task waits for its account to have room in this process
BUSY_WAIT = 0.5  # seconds before messages of an account still at its in-flight cap try again
MISSED_SLOT = object()  # a send that woke too late for its reserved rate-limit instant
THROTTLE_LEAD = 0.25  # of throttle_wait: how early a throttled message comes back for its next slot
BROKER_WAIT_MAX = 60.0  # longer waits are held in the store (released by the beat), never as Celery ETAs


@dataclass
class BatchReport:
    """What one dispatch did, for logs, tests and benchmarks."""

    claimed: int = 0
    expired: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)  # message id -> status after the attempt
    retry_in: dict[str, float] = field(default_factory=dict)  # message id -> seconds until re-sent


def dispatch_batch(
    ids: Sequence[str],
    *,
    settings: Settings | None = None,
    clock: Callable[[], datetime] = utcnow,
    enqueue: Callable[[list[str], float], None] | None = None,
    wait: bool = True,
) -> BatchReport:
    """Send the due, still-queued messages among `ids` once each and record what happened.

    With wait=False (the Celery task) it returns once the claim is committed and the sends are
    started on the process's event loop: the task's worker slot is free while the provider
    answers, so a slow provider holds no slot another provider's messages need. The claim is
    the durable record from then on: a worker that dies mid-send leaves `sending` rows that the
    beat's reaper settles.
    """
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    report = BatchReport()
    loop = transport.process_loop(s.in_flight)
    claimed, now = _claim_what_fits(ids, s, loop, clock, report, enqueue)
    if not claimed:
        return report
    claimed.sort(key=lambda m: (m.created_at, m.id))  # first in, first out within an account
    try:
        transport.warm_up(s.in_flight)
        for m in claimed:
            runtime.adapter_for(m.provider)
    except BaseException:
        for m in claimed:
            loop.give_back(m.provider, 1)
        raise
    # Reserve send instants only now that the claim is committed, so that they start at once:
    # a send that goes later than its reserved instant would crowd the next one at the provider.
    send_at, later = admit([(m.id, m.provider) for m in claimed], s, loop)
    if later:
        claimed = [m for m in claimed if m.id in send_at]
        _postpone(later, now, s, enqueue)
    report.claimed = len(claimed)
    if not claimed:
        return report

    async def send_and_record() -> BatchReport:
        try:
            results = await send_all(claimed, send_at)
            return await asyncio.to_thread(_record, claimed, results, report, now, s, clock, enqueue)
        finally:
            for m in claimed:
                loop.give_back(m.provider, 1)

    if wait:
        return loop.run(send_and_record)
    loop.submit(send_and_record)
    return report


def _claim_what_fits(ids: Sequence[str], s: Settings, loop: transport.LoopThread, clock: Callable[[], datetime],
                     report: BatchReport, enqueue: Callable[[list[str], float], None] | None
                     ) -> tuple[list[Message], datetime]:
    """Room first, claim second: claim only what this process can send now.

    Room is the per-account cap of requests in flight (`loop.reserve`, waiting up to
    BUSY_WAIT_MAX for it). Messages without room are not written to; they go back to the
    broker in a new task. Claiming whole batches and giving back (`sending -> queued`) what
    found no room claimed 3.8 rows and unclaimed 2.8 for every message sent (5,000 on
    PostgreSQL; README "Throughput"). Overdue messages (past not_after) expire here. The room
    of every claimed message stays taken; it is given back when its send is recorded.
    """
    with session_scope(s.database_url) as db:
        waiting = queries.waiting(db, ids)
    by_account: dict[str, list[str]] = {}
    for row in waiting:
        if row.status == QUEUED:
            by_account.setdefault(row.provider, []).append(row.id)
    chosen: dict[str, str] = {}  # id -> account, with room taken for it
    busy: dict[str, float] = {}  # id -> seconds until it is tried again (still queued, untouched)
    try:
        for account, mids in by_account.items():
            room = loop.reserve(account, len(mids), BUSY_WAIT_MAX)
            chosen.update((mid, account) for mid in mids[:room])
            busy.update((mid, BUSY_WAIT) for mid in mids[room:])
        now = clock()
        overdue = [row.id for row in waiting if row.not_after is not None and row.not_after < now]
        with session_scope(s.database_url) as db:
            if overdue:
                report.expired = queries.expire_overdue(db, overdue, now)
            claimed = queries.claim(db, list(chosen), now)
    except BaseException:
        for account in chosen.values():
            loop.give_back(account, 1)
        raise
    for m in claimed:
        chosen.pop(m.id)
    for account in chosen.values():  # room taken for a message someone else claimed (or cancelled) meanwhile
        loop.give_back(account, 1)
    if busy:
        try:
            _requeue(busy, enqueue)
        except BrokerUnavailable as exc:
            log.warning("could not re-enqueue %d message(s) waiting for room (%s); the beat will", len(busy), exc)
    return claimed, now


def _record(claimed: Sequence[Message], results: Sequence[SendResult | BaseException | object], report: BatchReport,
            now: datetime, s: Settings, clock: Callable[[], datetime],
            enqueue: Callable[[list[str], float], None] | None) -> BatchReport:
    """Settle and store the outcome of every send of a batch (runs in a thread beside the loop)."""
    missed = {m.id: 0.05 for m, r in zip(claimed, results) if r is MISSED_SLOT}
    if missed:  # woke too late for its reserved instant: give it back rather than crowd the next
        _postpone(missed, now, s, enqueue)
        kept = [(m, r) for m, r in zip(claimed, results) if r is not MISSED_SLOT]
        claimed, results = [m for m, _ in kept], [r for _, r in kept]
        report.claimed -= len(missed)
    _learn(claimed, results)
    finished = clock()
    settlements = [settle(m, r, now, finished, s) for m, r in zip(claimed, results)]
    with session_scope(s.database_url) as db:
        queries.record(db, settlements)
    for st in settlements:
        report.statuses[st.message_id] = st.values["status"]
        if st.values["status"] == QUEUED:
            report.retry_in[st.message_id] = max((st.values["due_at"] - finished).total_seconds(), 0.0)
    _log_outcomes(claimed, settlements)
    try:
        _requeue(report.retry_in, enqueue)
    except BrokerUnavailable as exc:
        log.warning("could not enqueue %d retry(ies) (%s); the beat will", len(report.retry_in), exc)
    return report


def admit(
    waiting: Sequence[tuple[str, str]], s: Settings, loop: transport.LoopThread
) -> tuple[dict[str, tuple[float, float | None]], dict[str, float]]:
    """Ask the global limiter, once per account, for send instants for claimed messages whose
    room in the process (`loop.reserve`) is already taken; room not used is given back.

    Returns ({id: (time.monotonic() instant to send at, lateness allowed or None)},
    {id: seconds until it should be tried again}). The lateness allowed is the limiter's
    slack (half its jitter margin): a later send could crowd the next reserved one at the provider.
    What cannot go within `throttle_wait` is put back without an attempt counted.
    """
    by_account: dict[str, list[str]] = {}
    for mid, account in waiting:
        by_account.setdefault(account, []).append(mid)
    admitted: dict[str, tuple[float, float | None]] = {}
    later: dict[str, float] = {}
    for account, mids in by_account.items():
        rate = s.providers[account].rate_limit if account in s.providers else None
        try:
            r = runtime.limiter().reserve(account, rate, len(mids), max_wait=s.throttle_wait)
        except RateLimiterUnavailable as exc:
            loop.give_back(account, len(mids))
            log.warning("rate limiter unreachable (%s); %d message(s) of %s wait", exc, len(mids), account)
            later.update({mid: REDIS_DOWN_WAIT for mid in mids})
            continue
        loop.give_back(account, len(mids) - r.granted)
        reserved_at = time.monotonic()
        slack = None if rate is None else r.slack
        admitted.update(zip(mids[: r.granted], ((reserved_at + d, slack) for d in r.delays)))
        metrics.limiter_waits(account, r.delays, len(mids) - r.granted)
        if r.granted < len(mids):
            wait = r.retry_after if r.retry_after is not None else s.throttle_wait
            if r.paused_until is not None:
                wait = max(wait, r.paused_until - r.server_time)
                log.info("account %s paused by its provider for %.1fs; %d message(s) wait", account, wait,
                         len(mids) - r.granted)
            else:
                # Come back a little before the next free slot, while this round's slots are
                # still being used: the next round is booked before this one runs out, so the
                # account never idles for a broker round trip between rounds.
                wait -= THROTTLE_LEAD * s.throttle_wait
            later.update({mid: max(wait, 0.05) for mid in mids[r.granted :]})
    return admitted, later


def _postpone(later: dict[str, float], now: datetime, s: Settings,
              enqueue: Callable[[list[str], float], None] | None) -> None:
    """Throttled messages are given back (`sending -> queued`, no attempt counted) to wait for
    their turn without a worker slot; a long provider pause waits in the store as `scheduled`."""
    soon = {mid: w for mid, w in later.items() if w <= BROKER_WAIT_MAX}
    far = [mid for mid, w in later.items() if w > BROKER_WAIT_MAX]
    by_wait: dict[float, list[str]] = {}
    for mid, wait in later.items():
        by_wait.setdefault(wait, []).append(mid)
    with session_scope(s.database_url) as db:
        for wait, mids in by_wait.items():  # one statement per distinct wait (usually one per account)
            queries.unclaim(db, mids, now, now + timedelta(seconds=wait))
        if far:  # the beat releases them when the pause is over
            queries.postpone(db, far, now, now + timedelta(seconds=max(later[m] for m in far)), status=SCHEDULED)
    try:
        _requeue(soon, enqueue)
    except BrokerUnavailable as exc:
        log.warning("could not re-enqueue %d throttled message(s) (%s); the beat will", len(soon), exc)


def _learn(claimed: Sequence[Message], results: Sequence[SendResult | BaseException]) -> None:
    """Pass what providers said about their limits to the shared limiter (pauses every worker)."""
    for m, r in zip(claimed, results):
        if isinstance(r, SendResult) and r.rate is not None and r.rate.pause_until is not None:
            try:
                runtime.limiter().learn(m.provider, r.rate)
            except RateLimiterUnavailable:
                log.warning("could not record a provider pause for %s: rate limiter unreachable", m.provider)


async def send_all(
    messages: Sequence[Message], send_at: dict[str, tuple[float, float | None]] | None = None
) -> list[SendResult | BaseException | object]:
    """Send every message concurrently over the process's shared client, each at its reserved
    instant; one that wakes later than its allowed lateness is not sent (MISSED_SLOT)."""
    client = transport.process_loop().client()
    send_at = send_at or {}

    async def one(m: Message) -> SendResult | object:
        adapter = runtime.adapter_for(m.provider)
        at, slack = send_at.get(m.id, (0.0, None))
        if at - time.monotonic() > 0:
            await asyncio.sleep(at - time.monotonic())
        if slack is not None and time.monotonic() > at + slack:
            return MISSED_SLOT
        return await adapter.send(client, outbound(m))

    return await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)


def outbound(m: Message) -> OutboundMessage:
    return OutboundMessage(
        id=m.id,
        to=m.to,
        text=m.text,
        options=dict(m.options or {}),
        not_before=m.not_before,
        not_after=m.not_after,
        attempt_key=m.attempt_key or m.id,
        provider_ref=m.provider_ref,
    )


def settle(
    m: Message, result: SendResult | BaseException, started: datetime, now: datetime, s: Settings
) -> queries.Settlement:
    """Decide the message's next state from one attempt's result (the one visible branch)."""
    v = _unchanged(m, now)
    if isinstance(result, BaseException):
        v.update(status=UNKNOWN, error_code="internal_error", finished_at=now,
                 error=f"send raised {type(result).__name__}: {result}"[:500])
        return queries.Settlement(m.id, v, _attempt(m, started, None, "unknown", "internal_error", v["error"], 0.0))
    outcome = result.outcome
    if isinstance(outcome, Accepted):
        v.update(status=ACCEPTED, provider_ref=outcome.provider_ref, accepted_at=now,
                 provider_status=outcome.provider_status, error_code=None, error=None, due_at=None)
        if _has_status(m.provider):  # due_at of an accepted message = its next status poll
            v["due_at"] = now + timedelta(seconds=s.poll_first)
        if outcome.segments:
            v["segments"] = outcome.segments
        if outcome.cost is not None:
            v.update(cost=outcome.cost, cost_currency=outcome.cost_currency)
        kind = "accepted"
    elif isinstance(outcome, Rejected):
        v.update(status=REJECTED, error_code=outcome.code, error=outcome.message, finished_at=now)
        kind = "rejected"
    elif isinstance(outcome, RetryLater):
        # A 429 is the provider's own limit speaking: the message waits for its turn (the pause
        # is learned for the whole account) and, as with our own throttling, no attempt is spent.
        throttled = result.http_status == 429
        kind = "throttled" if throttled else "retry"
        v.update(error_code=outcome.code, error=outcome.message)
        if throttled:
            v["attempts"] = m.attempts - 1
        delay = backoff(v["attempts"], s.retry_base, s.retry_cap)
        if outcome.retry_at is not None:
            delay = max(delay, outcome.retry_at - now.timestamp())
        due = now + timedelta(seconds=delay)
        if outcome.ambiguous and _unsafe_to_resend(m.provider, s):
            v.update(status=UNKNOWN, finished_at=now, error=(
                f"the request may have reached the provider ({outcome.code}: {outcome.message}); "
                "not resent, as the account's on_timeout says")[:500])
            kind = "unknown"
        elif not throttled and m.attempts >= s.max_attempts:
            v.update(status=FAILED, finished_at=now,
                     error=f"gave up after {m.attempts} attempts; last: {outcome.code} {outcome.message}".strip())
        elif m.not_after is not None and due > m.not_after:
            v.update(status=EXPIRED, finished_at=now,
                     error=f"not_after passes before the next attempt could go; last: {outcome.code}")
        else:
            # A short wait rides a Celery countdown; a long one waits in the store for the beat.
            v.update(status=QUEUED if delay <= BROKER_WAIT_MAX else SCHEDULED, due_at=due)
            if not outcome.ambiguous:
                v["attempt_key"] = str(uuid.uuid4())
    else:  # pragma: no cover - the Outcome union is closed
        raise TypeError(f"unknown outcome {outcome!r}")
    code = getattr(outcome, "code", None)
    detail = getattr(outcome, "message", None)
    return queries.Settlement(
        m.id, v, _attempt(m, started, result.http_status, kind, code, detail, result.latency_ms)
    )


def _unsafe_to_resend(account: str, s: Settings) -> bool:
    """An ambiguous failure (the provider may have the message) must not be retried: the account
    asks for `on_timeout = "unknown"` and its kind cannot make a resend harmless."""
    acct = s.providers.get(account)
    if acct is None or acct.on_timeout != "unknown":
        return False
    return not runtime.adapter_for(account).idempotent_retry


def _has_status(account: str) -> bool:
    try:
        return runtime.adapter_for(account).has_status
    except Exception:  # noqa: BLE001 - an account removed from the config: nothing to poll
        return False


def _unchanged(m: Message, now: datetime) -> dict:
    return {
        "status": m.status, "attempts": m.attempts, "due_at": m.due_at, "attempt_key": m.attempt_key, "provider_ref": m.provider_ref,
        "provider_status": m.provider_status, "segments": m.segments, "cost": m.cost,
        "cost_currency": m.cost_currency, "error_code": m.error_code, "error": m.error,
        "accepted_at": m.accepted_at, "finished_at": m.finished_at, "claimed_at": None, "updated_at": now,
    }


def _attempt(m: Message, started: datetime, http_status: int | None, outcome: str, code: str | None,
             detail: str | None, latency_ms: float) -> dict:
    return {
        "message_id": m.id, "number": m.attempts, "started_at": started, "http_status": http_status,
        "outcome": outcome, "provider_code": code, "detail": (detail or None) and detail[:500],
        "latency_ms": round(latency_ms, 2),
    }


def _log_outcomes(claimed: Sequence[Message], settlements: Sequence[queries.Settlement]) -> None:
    metrics.sends_settled(claimed, settlements)
    for m, st in zip(claimed, settlements):
        status = st.values["status"]
        level = logging.INFO if status in (ACCEPTED, QUEUED, SCHEDULED) else logging.WARNING
        log.log(level, "message %s to %s via %s attempt %d -> %s %s", m.id, mask(m.to), m.provider,
                m.attempts, status, st.values.get("error_code") or "", extra=about(m.id, m.provider, m.attempts))


def _requeue(retry_in: dict[str, float], enqueue: Callable[[list[str], float], None] | None) -> None:
    if not retry_in:
        return
    if enqueue is None:
        from .queue import enqueue as enqueue_ids

        enqueue = enqueue_ids
    by_delay: dict[int, list[str]] = {}
    for mid, delay in retry_in.items():
        by_delay.setdefault(int(delay * 10) + 1, []).append(mid)  # round up: never arrive before due
    for tenths, ids in by_delay.items():
        enqueue(ids, tenths / 10.0)
