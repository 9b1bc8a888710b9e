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

A message's attempt is one claim, recorded in the store at each step (docs/failures.md):

    claim       queued -> sending, naming the claim (token) and this worker process
    start       started_at set, compare-and-set on the claim, just before the request is written
                (a rate-limited one: as far ahead of its slot as start writes lately need,
                StartTimes); a message whose start is not recorded is never sent
    record      the outcome, written only while the same claim still holds the message

so a task delivered twice sends once, a late result never lands on a later claim, and the
reaper (recovery.py) can tell of a dead worker's claims which never started (sent again)
from which may have reached the provider (asked, or `unknown`). The HTTP requests of a
batch run concurrently on the process's event loop (transport.py); a batch's claim is one
UPDATE ... RETURNING, its starts one UPDATE per turn of the loop (up to three out at once),
its record one executemany; the statements are Core, built once (store/queries.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from operator import attrgetter, itemgetter
from datetime import datetime, timedelta
from typing import Any, Callable, Sequence

from . import liveness, metrics, runtime, transport
from .config import Settings
from .errors import BrokerUnavailable
from .logs import about
from .ratelimit import RateLimiterUnavailable
from .ratelimit.strategy import CONFIRM_LEAD, PRIORITY_GUARD
from .providers.base import Accepted, OutboundMessage, Rejected, RetryLater, SendResult
from .redact import mask
from .retry import backoff
from .store import queries
from .store import loopstarts
from .store.db import connection_scope, ensure_schema, is_sqlite
from .store.models import ACCEPTED, EXPIRED, FAILED, QUEUED, REJECTED, SCHEDULED, SENDING, UNKNOWN, Message, utcnow

log = logging.getLogger("dispatcher.dispatch")
REDIS_DOWN_WAIT = 2.0  # seconds before a batch retries when the limiter's Redis is unreachable
BUSY_WAIT_MAX = 2.0  # seconds a task waits for its account to have room in this process
BUSY_WAIT = 0.5  # seconds before messages of an account still at its in-flight cap try again
MISSED_SLOT = object()  # a send that woke too late for its reserved rate-limit instant: not sent
NOT_STARTED = object()  # not sent: the worker is stopping, or its start could not be recorded
NOT_OURS = object()  # not sent: the claim was taken from this worker (the reaper judged it dead)
STARTED = object()
MARK_LEAD = 0.02  # seconds before a reserved slot a start is recorded, at least (kinds with a harmless resend)
START_LEAD_MAX = 0.05  # seconds before a reserved slot a start is recorded, at most (StartTimes)
RECORD_PATIENCE = 120.0  # seconds a batch's record is retried while the store is away
THROTTLE_LEAD = 0.25  # of throttle_wait: how early a throttled message comes back for its next slot
BROKER_WAIT_MAX = 60.0  # longer waits are held in the store (released by the beat), never as Celery ETAs


@dataclass
class BatchReport:
    """What one dispatch did, for logs, tests and benchmarks."""

    claimed: int = 0
    expired: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)  # message id -> status after the attempt
    retry_in: dict[str, float] = field(default_factory=dict)  # message id -> seconds until re-sent


@dataclass
class Claim:
    """One claim statement's messages: its token, the worker holding it, and when it was made."""

    token: str
    worker: str
    at: datetime
    messages: list[Message]


@dataclass(frozen=True)
class Slot:
    """When a message may go: its reserved instant (time.monotonic()), the lateness allowed
    (None: any), and for a campaign message the ticket that confirms the slot is still its own."""

    at: float
    slack: float | None = None
    ticket: str | None = None


def prepare(settings: Settings | None = None) -> None:
    """Do at a worker's start what its first batch would otherwise do while its messages wait:
    check the schema, start the heartbeat, the send loop and its Wire, load each account's
    adapter, open a store connection and compile the first statement of the send path."""
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    liveness.ensure_alive(s.database_url, s.heartbeat_seconds)
    transport.warm_up(s.in_flight)
    for account in s.providers:
        runtime.adapter_for(account)
    with connection_scope(s.database_url, autocommit=True) as db:
        queries.waiting(db, ["-"])  # no such id: only the connection and the statement are made


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
    answers, so a slow provider holds no slot another provider's messages need. From then on
    the claim is the durable record: a worker that dies mid-send leaves `sending` rows naming
    it, which the reaper (recovery.py) settles once its heartbeat stops.
    """
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    liveness.ensure_alive(s.database_url, s.heartbeat_seconds)  # registered before it claims anything
    report = BatchReport()
    loop = transport.process_loop(s.in_flight)
    with connection_scope(s.database_url, autocommit=True) as db:
        waiting = queries.waiting(db, ids)
    orphans = [row.id for row in waiting if row.provider not in s.providers]
    if orphans:  # never claimed: they wait, queued, for their account to be configured again
        log.error("%d message(s) of accounts no longer configured are left queued: %s", len(orphans),
                  ",".join(orphans[:50]))
        waiting = [row for row in waiting if row.provider in s.providers]
    want: Counter[str] = Counter(row.provider for row in waiting if row.status == QUEUED)
    with loop.room(want, BUSY_WAIT_MAX) as room:
        claim = _claim_what_fits(waiting, room, s, clock, report, enqueue)
        room.keep_only(Counter(m.provider for m in claim.messages))
        if not claim.messages:
            return report
        try:
            transport.warm_up(s.in_flight)
            for m in claim.messages:
                runtime.adapter_for(m.provider)
            # Reserve send instants only now that the claim is committed, so that they start at once:
            # a send that goes later than its reserved instant would crowd the next one at the provider.
            send_at, later = admit([(m.id, m.provider, m.campaign_id is not None) for m in claim.messages], s, room)
        except BaseException:
            log.exception("dispatch failed between claim and send; handing back %d message(s) unstarted: %s",
                          len(claim.messages), ",".join(m.id for m in claim.messages))
            _hand_back_surely(claim, {m.id: BUSY_WAIT for m in claim.messages}, s, enqueue, loop)
            raise
        if later:
            _hand_back_surely(claim, later, s, enqueue, loop)
            claim.messages = [m for m in claim.messages if m.id in send_at]
        report.claimed = len(claim.messages)
        if not claim.messages:
            return report
        job = SendJob(claim, send_at, room.handover(), s, clock, enqueue, report)
    if wait:
        return loop.run(job.run)
    try:
        future = loop.submit(job.run)
    except BaseException:  # the loop is shut (the worker stopping): nothing started, all go back
        log.exception("could not start the sends of claim %s; handing back %d message(s) unstarted: %s",
                      claim.token, len(claim.messages), ",".join(m.id for m in claim.messages))
        job.room.close()
        _hand_back(claim, {m.id: BUSY_WAIT for m in claim.messages}, s, enqueue)
        raise
    future.add_done_callback(job.check)
    return report


def _claim_what_fits(waiting: Sequence, room: transport.Room, s: Settings, clock: Callable[[], datetime],
                     report: BatchReport, enqueue: Callable[[list[str], float], None] | None) -> Claim:
    """Room first, claim second: claim only what this process can send now.

    Room is the per-account cap of messages held by the process, claimed or in flight (`room`,
    taken waiting up to BUSY_WAIT_MAX; transport.py: up to twice the requests it may have in flight).
    Messages without room are not written to; they go back to the broker in a new task. Claiming
    whole batches and giving back what found no room claimed 3.8 rows and unclaimed 2.8 for
    every message sent (5,000 on PostgreSQL; docs "Throughput"). Overdue messages (past
    not_after) expire here.
    """
    left = Counter(room.held)
    chosen: list[str] = []
    busy: dict[str, float] = {}  # id -> seconds until it is tried again (still queued, untouched)
    for row in waiting:
        if row.status != QUEUED:
            continue
        if left[row.provider] > 0:
            left[row.provider] -= 1
            chosen.append(row.id)
        else:
            busy[row.id] = BUSY_WAIT
    now = clock()
    claim = Claim(uuid.uuid4().hex, liveness.worker_id(), now, [])
    overdue = [row.id for row in waiting if row.not_after is not None and row.not_after < now]
    with connection_scope(s.database_url, autocommit=True) as db:  # each statement a compare-and-set of its own
        if overdue:
            report.expired = queries.expire_overdue(db, overdue, now)
        claim.messages = list(queries.claim(db, chosen, now, claim.token, claim.worker))
    claim.messages.sort(key=lambda m: (m.created_at, m.id))  # first in, first out within an account
    if busy:
        try:
            _requeue(busy, enqueue)
        except BrokerUnavailable as exc:
            log.warning("could not re-enqueue %d message(s) waiting for room (%s); the beat will", len(busy), exc)
    return claim


class SendJob:
    """The background half of a dispatch: start, send and record one claim's messages.

    It owns the claim's room in the process and gives it back when its outcomes are stored.
    Every message ends in one of: a recorded attempt (`settle`), handed back unstarted (the
    rate-limit slot was missed, or the worker is stopping), or left alone (the claim was
    taken from this worker meanwhile).
    """

    def __init__(self, claim: Claim, send_at: dict[str, Slot], room: transport.Room,
                 s: Settings, clock: Callable[[], datetime], enqueue: Callable[[list[str], float], None] | None,
                 report: BatchReport) -> None:
        self.claim, self.send_at, self.room, self.s = claim, send_at, room, s
        self.clock, self.enqueue, self.report = clock, enqueue, report

    async def run(self) -> BatchReport:
        with self.room:
            stopping = transport.process_loop().stopping
            starts = Starts(self.s.database_url, self.claim.token, self.clock)
            results = await send_all(self.claim.messages, self.send_at, starts, stopping, self.room,
                                     BulkSlots(self.s))
            await record_durably(self.s, lambda: _record(self.claim, results, self.report, self.s, self.clock,
                                                         self.enqueue), [m.id for m in self.claim.messages])
        return self.report

    def check(self, future: "concurrent.futures.Future") -> None:
        """Done-callback of the background run: a failure is logged with the ids it leaves `sending`."""
        exc = future.exception() if not future.cancelled() else None
        if future.cancelled() or exc is not None:
            ids = [m.id for m in self.claim.messages]
            log.error("send job of claim %s failed (%s); %d message(s) stay `sending` for the reaper: %s",
                      self.claim.token, exc or "cancelled", len(ids), ",".join(ids),
                      exc_info=(type(exc), exc, exc.__traceback__) if exc else None)


class Starts:
    """Records that claims' requests start (just before they are written), many at once.

    Every send that reaches its instant in the same turn of the event loop joins one
    compare-and-set UPDATE; only the ids it returns are sent. If the store cannot be written,
    nothing is sent: a request never goes out unrecorded. A start recorded for a send that
    then does not go (it woke too late for its slot) is taken back at once (`unstart`), so a
    crash leaves it "never started" and it is sent again, not written off.
    """

    def __init__(self, url: str, token: str, clock: Callable[[], datetime]) -> None:
        self.url, self.token, self.clock = url, token, clock
        self._deadlines: dict[str, float] = {}  # message id -> the latest its request may go (monotonic)
        self._late: set[str] = set()  # ids a write found past their deadline: no start recorded
        if is_sqlite(url):  # through a thread: SQLite's writes queue on its lock
            # one write at a time: concurrent ones would only queue on the lock, each slower, and a
            # start recorded late is taken back (the slot missed): more "may have started" gaps
            self._marks, self._unmarks = _Coalesced(self._mark, at_once=1), _Coalesced(self._unmark, at_once=1)
        else:  # from the loop itself (store/loopstarts.py)
            self._marks, self._unmarks = _Coalesced(self._mark_here), _Coalesced(self._unmark_here)

    async def start(self, message_id: str, deadline: float | None = None) -> object:
        """STARTED, NOT_OURS (the claim moved on, or its campaign stopped and it was handed back),
        NOT_STARTED (the store was unreachable) or MISSED_SLOT (the write came too late).

        `deadline` (time.monotonic()) is the latest its request may go: the write checks it once
        it holds the store (on SQLite, after waiting for the lock) and records no start past it.
        A start recorded and only then found late has to be taken back by a second write, and a
        worker killed in between leaves a claim that "may have started" though nothing went."""
        if deadline is not None:
            self._deadlines[message_id] = deadline
        began = time.monotonic()
        try:
            answer = await self._marks.submit(message_id, STARTED)
        finally:
            self._deadlines.pop(message_id, None)
            start_times.add(time.monotonic() - began)
        if message_id in self._late:
            self._late.discard(message_id)
            return MISSED_SLOT
        return answer

    def _in_time(self, ids: list[str]) -> list[str]:
        """The ids whose deadline has not passed; the others are noted late (start() says so)."""
        now = time.monotonic()
        late = {i for i in ids if self._deadlines.get(i, math.inf) < now}
        if not late:
            return ids
        self._late |= late
        return [i for i in ids if i not in late]

    async def unstart(self, message_id: str) -> None:
        await self._unmarks.submit(message_id, STARTED)

    def _mark(self, ids: list[str]) -> set[str]:
        with connection_scope(self.url, autocommit=True) as db:  # SQLite: the lock is held from here
            now = self.clock()
            ids = self._in_time(ids)
            ours = queries.mark_started(db, ids, self.token, now)
        if len(ours) < len(ids):
            self._hand_back_stopped([i for i in ids if i not in ours], now)
        return ours

    def _unmark(self, ids: list[str]) -> set[str]:
        with connection_scope(self.url, autocommit=True) as db:
            return queries.mark_started(db, ids, self.token, None)

    async def _mark_here(self, ids: list[str]) -> set[str]:
        now = self.clock()
        ids = self._in_time(ids)
        if not ids:
            return set()
        ours = await self._writer().mark_started(ids, self.token, now)
        if len(ours) < len(ids):
            await asyncio.to_thread(self._hand_back_stopped, [i for i in ids if i not in ours], now)
        return ours

    def _hand_back_stopped(self, ids: list[str], now: datetime) -> None:
        """Claims whose start was refused though still this claim's: their campaign was paused or
        cancelled since the claim. They go back unstarted (if this fails, the whole write fails:
        none of its ids is sent, and the record hands them all back)."""
        with connection_scope(self.url) as db:
            held = queries.hand_back(db, ids, self.token, now, now, unstarted_only=True)
        if held:
            log.info("%d claimed message(s) of a paused or cancelled campaign handed back before their start: %s",
                     len(held), ",".join(held))

    async def _unmark_here(self, ids: list[str]) -> set[str]:
        return await self._writer().mark_started(ids, self.token, None)

    def _writer(self) -> loopstarts.LoopStarts:
        writer, new = loopstarts.for_loop(self.url)
        if new:
            transport.process_loop().at_close(loopstarts.close_for_loop)
        return writer


class StartTimes:
    """How long recording a start has taken lately on this process's send loop (the median and
    the 90th percentile of the last 32, from the send's call to its answer: the store's round
    trip, the wait for a turn and the loop's lag), and so how far ahead of a rate-limited
    send's slot its start write must begin to end in time (`lead`).

    A start recorded after the slot's slack is taken back and the message goes round again;
    begun at the slot itself, a write slower than the slack (10 ms for an "N/s" limit: a store
    across a network, or a loop busy with a bulk send) made every such send miss, for ever.
    """

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=32)
        self.p50 = self.p90 = 0.0
        self._added = 0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self._added += 1
        if self._added % 8 == 0:  # sorted every 8th: this runs once per message sent
            ordered = sorted(self.recent)
            self.p50, self.p90 = ordered[len(ordered) // 2], ordered[len(ordered) * 9 // 10]

    def lead(self, slack: float, harmless_resend: bool) -> float:
        """Seconds before its slot a send with `slack` begins its start write. Where a resend is
        harmless, early enough for nine writes in ten (at least MARK_LEAD); elsewhere only as
        early as a typical write needs to end within half the slack, so that a worker killed
        after the write and before its request (a message written off `unknown` that never
        went) stays unlikely: a slower write than that misses the slot and goes round again."""
        if harmless_resend:
            return max(MARK_LEAD, min(self.p90, START_LEAD_MAX))
        return min(max(self.p50 - slack / 2, 0.0), START_LEAD_MAX)


start_times = StartTimes()  # used from the send loop's thread only


class BulkSlots:
    """Confirms campaign messages' rate-limit slots just before use (CONFIRM_LEAD ahead of each),
    all that come due in one turn of the loop in one Redis round trip. A slot that a single
    send took meanwhile (ratelimit/strategy.py, "Priority") is replaced by a new one, at the
    end of the account's reserved slots."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self._confirms = _Coalesced(self._confirm, "confirm the rate-limit slots of")
        self._tickets: dict[str, tuple[str, str]] = {}  # message id -> (account, ticket) being confirmed

    async def hold(self, message_id: str, account: str, slot: Slot, ahead: float = 0.0) -> object:
        """The slot to send at, now this message's for good (a Slot without a ticket), confirmed
        CONFIRM_LEAD before the send's start write begins (`ahead` of the slot); MISSED_SLOT when
        no new slot comes within throttle_wait, NOT_STARTED when Redis is away: either way the
        message is handed back unstarted."""
        while slot.ticket is not None:
            await _until(slot.at - ahead - CONFIRM_LEAD)
            self._tickets[message_id] = (account, slot.ticket)
            answer = await self._confirms.submit(message_id, STARTED)
            if answer is STARTED:
                return Slot(slot.at, slot.slack)
            if answer is NOT_STARTED:
                return NOT_STARTED
            again = await asyncio.to_thread(self._again, account)
            if not isinstance(again, Slot):
                return again
            slot = again
        return slot

    def _confirm(self, ids: list[str]) -> set[str]:
        by_account: dict[str, list[tuple[str, str]]] = {}
        for mid in ids:
            account, ticket = self._tickets.pop(mid)
            by_account.setdefault(account, []).append((mid, ticket))
        ours: set[str] = set()
        for account, held in by_account.items():
            answers = runtime.limiter().confirm(account, [t for _, t in held])
            ours.update(mid for (mid, _), ok in zip(held, answers) if ok)
        return ours

    def _again(self, account: str) -> object:
        rate = self.s.providers[account].rate_limit
        try:
            r = runtime.limiter().reserve(account, rate, 1, max_wait=self.s.throttle_wait, bulk=True)
        except RateLimiterUnavailable:
            return NOT_STARTED
        if not r.granted:
            return MISSED_SLOT
        metrics.limiter_waits(account, r.delays, 0)
        return _slot(time.monotonic(), r.delays[0], r.slack if rate is not None else None, r.tickets[0])


def _slot(reserved_at: float, delay: float, slack: float | None, ticket: str | None) -> Slot:
    """A reserved slot; a bulk ticket is dropped when the slot is too close for any single send
    to take it (PRIORITY_GUARD), so it needs no confirm."""
    return Slot(reserved_at + delay, slack, ticket if delay >= PRIORITY_GUARD else None)


WRITES_AT_ONCE = 3  # coalesced writes out at a time (_Coalesced), where the store takes them concurrently


class _Coalesced:
    """Runs `write(ids) -> ids done` (in a thread, or awaited if it is a coroutine function) for
    every id submitted in one turn of the loop.

    Up to `at_once` writes run at a time: an id submitted while a write is out goes in the
    next turn's write instead of waiting for that one to come back (which doubled the time a
    request slot was held before its request went, docs/throughput.md)."""

    def __init__(self, write: Callable[[list[str]], Any], what: str = "record the start of",
                 at_once: int = WRITES_AT_ONCE) -> None:
        self.write, self.what, self.at_once = write, what, at_once
        self.on_loop = asyncio.iscoroutinefunction(write)
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.scheduled = False  # a flush is due at the next turn of the loop
        self.writing = 0  # flushes under way

    async def submit(self, message_id: str, done: object) -> object:
        """`done` if the write covered the id, NOT_OURS if it did not, NOT_STARTED if it failed."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append((message_id, future))
        if not self.scheduled and self.writing < self.at_once:
            self.scheduled = True
            asyncio.ensure_future(self._flush(done))
        return await future

    async def _flush(self, done: object) -> None:
        self.scheduled = False
        self.writing += 1
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                ids = [mid for mid, _ in batch]
                try:
                    ours = await (self.write(ids) if self.on_loop else asyncio.to_thread(self.write, ids))
                except Exception as exc:  # noqa: BLE001 - an unreachable store: the callers send nothing
                    log.warning("could not %s %d message(s) (%s: %s): %s", self.what, len(ids),
                                type(exc).__name__, exc, ",".join(ids))
                    for _, f in batch:
                        if not f.done():  # (a caller cancelled meanwhile: nobody to tell)
                            f.set_result(NOT_STARTED)
                    continue
                for mid, f in batch:
                    if not f.done():
                        f.set_result(done if mid in ours else NOT_OURS)
        finally:
            self.writing -= 1


async def record_durably(s: Settings, step: Callable[[], object], ids: Sequence[str]) -> None:
    """Run a store step (in a thread) until it succeeds: a database that is busy, locked or away
    for a while delays the record but never drops it. After RECORD_PATIENCE it gives up, loudly:
    the messages stay `sending` under a live claim and the reaper's lease settles them."""
    delay, deadline = 0.2, time.monotonic() + RECORD_PATIENCE
    while True:
        try:
            await asyncio.to_thread(step)
            return
        except Exception as exc:  # noqa: BLE001 - every failure is seen, with the ids it concerns
            if time.monotonic() > deadline:
                log.error("gave up recording %d message(s) after %.0fs (%s: %s): %s", len(ids), RECORD_PATIENCE,
                          type(exc).__name__, exc, ",".join(ids))
                raise
            log.warning("recording %d message(s) failed (%s: %s); trying again in %.1fs: %s", len(ids),
                        type(exc).__name__, str(exc)[:200], delay, ",".join(ids[:20]))
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _record(claim: Claim, results: Sequence[object], report: BatchReport, s: Settings,
            clock: Callable[[], datetime], enqueue: Callable[[list[str], float], None] | None) -> BatchReport:
    """Settle and store the outcome of every message of a claim (runs in a thread beside the loop).

    Unstarted ones are handed back in the same transaction, so a retried record repeats nothing.
    """
    finished = clock()
    missed = {m.id: (0.05 if r is MISSED_SLOT else 0.0) for m, r in zip(claim.messages, results)
              if r is MISSED_SLOT or r is NOT_STARTED}
    sent = [(m, r) for m, r in zip(claim.messages, results) if isinstance(r, (SendResult, BaseException))]
    _learn(sent)
    settlements = [_settle_safely(m, r, claim, finished, s) for m, r in sent]
    handed = _store(s.database_url, claim.token, missed, finished, settlements)
    report.claimed -= len(missed)
    for st in settlements:
        report.statuses[st.message_id] = st.values["status"]
        if st.values["status"] == QUEUED:
            report.retry_in[st.message_id] = max((st.values["due_at"] - finished).total_seconds(), 0.0)
    _log_outcomes([m for m, _ in sent], settlements)
    retry = dict(report.retry_in)
    retry.update({mid: missed[mid] for mid in handed if missed[mid] <= BROKER_WAIT_MAX})
    try:
        _requeue(retry, enqueue)
    except BrokerUnavailable as exc:
        log.warning("could not enqueue %d retry(ies) (%s); the beat will", len(retry), exc)
    return report


def _store(url: str, token: str, missed: dict[str, float], now: datetime,
           settlements: list[queries.Settlement]) -> list[str]:
    """Hand back the unstarted (`missed`) and record a batch in one transaction; returns the ids
    handed back. If one row cannot be stored as it is, the transaction is run again storing the
    others and that one reduced to its status, so that one bad value never drops the outcomes of
    the rest (savepoints only then: each costs a round trip)."""
    from sqlalchemy.exc import OperationalError

    try:
        with connection_scope(url) as db:
            handed = _hand_back_in(db, token, missed, now)
            queries.record(db, settlements)
        return handed
    except OperationalError:
        raise  # the store is away or locked: record_durably tries the whole batch again
    except Exception as exc:  # noqa: BLE001 - one row the store cannot take as it is
        log.warning("a batch of %d outcome(s) could not be stored as one (%s); storing them one by one",
                    len(settlements), type(exc).__name__)
    with connection_scope(url) as db:
        handed = _hand_back_in(db, token, missed, now)
        for st in settlements:
            try:
                with db.begin_nested():
                    queries.record(db, [st])
            except OperationalError:
                raise
            except Exception as exc:  # noqa: BLE001 - DataError, or a driver's own (UnicodeEncodeError, OverflowError)
                log.error("message %s: outcome %s could not be stored (%s); storing its status alone", st.message_id,
                          st.values["status"], type(exc).__name__)
                with db.begin_nested():
                    queries.record(db, [_reduced(st)])
    return handed


def _reduced(st: queries.Settlement) -> queries.Settlement:
    v = _fit(dict(st.values))
    v.update(cost=None, cost_currency=None, provider_status=None)
    return queries.Settlement(st.message_id, v, None, st.claim_token)


_LIMITS = {"provider_ref": 200, "provider_status": 64, "error_code": 100, "cost_currency": 8, "error": 2000}


def _fit(v: dict) -> dict:
    """Provider words made storable (no NUL, no lone surrogate) and cut to their columns; a cost
    that is not a finite number dropped; a segment count kept within reason."""
    for column, limit in _LIMITS.items():
        if v.get(column) is not None:
            text = str(v[column]).replace("\x00", "")
            v[column] = text.encode("utf-8", "replace").decode("utf-8")[:limit]
    cost = v.get("cost")
    if cost is not None and not (isinstance(cost, (int, float)) and math.isfinite(cost)):
        v["cost"] = None
    segments = v.get("segments")
    if not isinstance(segments, int) or not 0 <= segments <= 10_000:
        v["segments"] = 0
    return v


def admit(
    waiting: Sequence[tuple[str, str, bool]], s: Settings, room: transport.Room
) -> tuple[dict[str, Slot], dict[str, float]]:
    """Ask the global limiter, once per account and class, for send instants for claimed messages
    (id, account, is a campaign's) whose room in the process is already taken (`room`); room
    not used is given back. Campaign messages reserve as bulk: a single send may take their
    slot until they confirm it (BulkSlots; ratelimit/strategy.py, "Priority").

    Returns ({id: Slot}, {id: seconds until it should be tried again}). A slot's lateness
    allowed is the limiter's slack (half its jitter margin): a later send could crowd the next
    reserved one at the provider. What cannot go within `throttle_wait` is put back without
    an attempt counted.
    """
    by_account: dict[tuple[str, bool], list[str]] = {}
    for mid, account, bulk in waiting:
        by_account.setdefault((account, bulk), []).append(mid)
    admitted: dict[str, Slot] = {}
    later: dict[str, float] = {}
    for (account, bulk), mids in by_account.items():
        rate = s.providers[account].rate_limit if account in s.providers else None
        try:
            r = runtime.limiter().reserve(account, rate, len(mids), max_wait=s.throttle_wait, bulk=bulk)
        except RateLimiterUnavailable as exc:
            room.release(account, len(mids))
            log.warning("rate limiter unreachable (%s); %d message(s) of %s wait", exc, len(mids), account)
            later.update({mid: REDIS_DOWN_WAIT for mid in mids})
            continue
        room.release(account, len(mids) - r.granted)
        reserved_at = time.monotonic()
        slack = None if rate is None else r.slack
        tickets = r.tickets or [None] * r.granted
        admitted.update(zip(mids[: r.granted], (_slot(reserved_at, d, slack, t) for d, t in zip(r.delays, tickets))))
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


def _hand_back(claim: Claim, later: dict[str, float], s: Settings,
               enqueue: Callable[[list[str], float], None] | None) -> None:
    """Throttled messages are given back unstarted (no attempt counted) to wait for their turn
    without a worker slot; a long provider pause waits in the store as `scheduled`."""
    with connection_scope(s.database_url) as db:
        handed = _hand_back_in(db, claim.token, later, claim.at)
    soon = {mid: later[mid] for mid in handed if later[mid] <= BROKER_WAIT_MAX}
    try:
        _requeue(soon, enqueue)
    except BrokerUnavailable as exc:
        log.warning("could not re-enqueue %d throttled message(s) (%s); the beat will", len(soon), exc)


def _hand_back_surely(claim: Claim, later: dict[str, float], s: Settings,
                      enqueue: Callable[[list[str], float], None] | None, loop: transport.LoopThread) -> None:
    """_hand_back now; if the store refuses, keep trying in the background (record_durably) rather
    than leave the messages `sending` under a live claim until the lease runs out."""
    try:
        _hand_back(claim, later, s, enqueue)
    except Exception as exc:  # noqa: BLE001 - retried, and logged with the ids
        ids = list(later)
        log.warning("could not hand back %d unstarted message(s) (%s: %s); trying again in the background: %s",
                    len(ids), type(exc).__name__, str(exc)[:200], ",".join(ids))
        loop.submit(lambda: record_durably(s, lambda: _hand_back(claim, later, s, enqueue), ids))


def _hand_back_in(db, token: str, later: dict[str, float], now: datetime) -> list[str]:  # type: ignore[no-untyped-def]
    """Hand back claims of `token` that never started, each due `later[id]` seconds from now:
    one statement per distinct wait (usually one per account)."""
    by_wait: dict[float, list[str]] = {}
    for mid, wait in later.items():
        by_wait.setdefault(wait, []).append(mid)
    handed: list[str] = []
    for wait, mids in by_wait.items():
        status = QUEUED if wait <= BROKER_WAIT_MAX else SCHEDULED  # the beat releases long waits
        handed += queries.hand_back(db, mids, token, now, now + timedelta(seconds=wait), status=status)
    return handed


def _learn(sent: Sequence[tuple[Message, object]]) -> None:
    """Pass what providers said about their limits to the shared limiter (pauses every worker)."""
    for m, r in sent:
        if isinstance(r, SendResult) and r.rate is not None and r.rate.pause_until is not None:
            try:
                runtime.limiter().learn(m.provider, r.rate)
            except RateLimiterUnavailable:
                log.warning("could not record a provider pause for %s: rate limiter unreachable", m.provider)


async def send_all(
    messages: Sequence[Message], send_at: dict[str, Slot] | None = None,
    starts: "Starts | None" = None, stopping: threading.Event | None = None, room: transport.Room | None = None,
    bulk_slots: BulkSlots | None = None,
) -> list[object]:
    """Send every message concurrently over the process's Wire (transport.py), each at its reserved
    instant, once `starts` has recorded that its request may begin (and a campaign message's slot
    is confirmed still its own: `bulk_slots`). A message is not sent
    (MISSED_SLOT, NOT_STARTED, NOT_OURS) when it wakes later than its allowed lateness, when the
    worker is stopping, or when its start cannot be recorded as this claim's.

    A request waits for one of its account's request slots (transport `request_slot`) just
    before its start is recorded. A message's share of `room` (what its account may hold claimed
    in the process) is given back as soon as its request is over or will not be made, not when
    the batch is recorded: the next claim's requests go while this one's outcomes are written."""
    loop = transport.process_loop()
    client = loop.wire()
    send_at = send_at or {}

    async def one(m: Message) -> object:
        try:
            return await attempt(m)
        finally:
            if room is not None:
                room.release(m.provider, 1)

    async def attempt(m: Message) -> object:
        adapter = runtime.adapter_for(m.provider)
        slot = send_at.get(m.id) or Slot(0.0)
        ticketed = slot.ticket is not None and bulk_slots is not None  # a single send may take it until confirmed
        # Record the start of a rate-limited send ahead of its slot, so that the store's latency
        # does not make it miss the slot (StartTimes, read close to the slot: as the store is
        # then): where a start recorded for nothing is harmless (a resend under the same key),
        # early enough for the whole write; elsewhere only as early as needed, so a crash
        # leaves the shortest "may have started" gap. A campaign's slot is confirmed before that.
        lead = 0.0
        if slot.slack is not None:
            await _until(slot.at - START_LEAD_MAX - (CONFIRM_LEAD if ticketed else 0.0))
            lead = start_times.lead(slot.slack, adapter.idempotent_retry)
        if ticketed:
            try:
                held = await bulk_slots.hold(m.id, m.provider, slot, lead)  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001 - nothing was sent: handed back unstarted, never `unknown`
                log.exception("could not hold the rate-limit slot of %s; handed back unstarted", m.id)
                return NOT_STARTED
            if not isinstance(held, Slot):
                return _not_sent(m, held, "its rate-limit slot was taken and no new one came in time")
            slot = held
        at, slack = slot.at, slot.slack
        await _until(at - lead)
        async with loop.request_slot(m.provider):  # the account's requests in flight in this process
            if stopping is not None and stopping.is_set():
                return _not_sent(m, NOT_STARTED, "the worker is stopping")
            if slack is not None and time.monotonic() > at + slack:
                return _not_sent(m, MISSED_SLOT, f"it woke {time.monotonic() - at:.3f}s after its rate-limit slot")
            if starts is not None:
                started = await starts.start(m.id, None if slack is None else at + slack)
                if started is not STARTED:
                    return _not_sent(m, started, "its start was not recorded as this claim's")
            while at - time.monotonic() > 0:  # uvloop rounds a sleep to the millisecond: it may wake early
                await asyncio.sleep(at - time.monotonic())
            late = time.monotonic() - at
            if slack is not None and late > slack:
                if starts is not None:  # the store was slow to record the start: nothing left, say so first
                    await starts.unstart(m.id)
                return _not_sent(m, MISSED_SLOT, f"its start was recorded {late:.3f}s after its rate-limit slot (begun "
                                 f"{lead:.3f}s ahead; start writes lately took {start_times.p50:.3f}s, "
                                 f"{start_times.p90:.3f}s at the 90th percentile)")
            return await adapter.send(client, outbound(m, adapter))

    return await asyncio.gather(*(one(m) for m in messages), return_exceptions=True)


async def _until(instant: float) -> None:
    """Sleep until `instant` (time.monotonic()), if it is still ahead."""
    if instant - time.monotonic() > 0:
        await asyncio.sleep(instant - time.monotonic())


def _not_sent(m: Message, answer: object, why: str) -> object:
    """`answer` (a message not sent, to be handed back), said in the log with the reason."""
    log.info("message %s not sent, handed back unstarted: %s", m.id, why)
    return answer


def outbound(m: Message, adapter: Any = None) -> OutboundMessage:
    """What the adapter of `m`'s account (`adapter`, if the caller has it) is given to send."""
    adapter = adapter or runtime.adapter_for(m.provider)
    return OutboundMessage(
        id=m.id,
        to=m.to,
        text=m.text,
        options=adapter.merged_options(m.options or {}),  # account defaults at send time (a new dict)
        not_before=m.not_before,
        not_after=m.not_after,
        attempt_key=m.attempt_key or m.id,
        provider_ref=m.provider_ref,
    )


def _settle_safely(m: Message, result: object, claim: Claim, now: datetime, s: Settings) -> queries.Settlement:
    """settle(), and if deciding fails (a bug, an odd provider value), the message is still
    settled: an accepted answer stays accepted, anything else becomes `unknown` (it may have gone)."""
    try:
        return settle(m, result, claim, now, s)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - logged with the message id; the batch goes on
        log.exception("message %s: could not settle its attempt's result; settling it from the outcome alone", m.id)
        outcome = getattr(result, "outcome", None)
        v = _unchanged(m, now)
        v["key_exposed"] = True
        if isinstance(outcome, Accepted):
            v.update(status=ACCEPTED, accepted_at=now, due_at=None, error_code=None, error=None,
                     provider_ref=outcome.provider_ref)
        else:
            v.update(status=UNKNOWN, finished_at=now, error_code="internal_error",
                     error=f"its result could not be read ({type(exc).__name__})")
        return queries.Settlement(m.id, _fit(v), _attempt(m, claim, None, v["status"], v["error_code"], v["error"], 0.0),
                                  claim.token)


def settle(m: Message, result: SendResult | BaseException, claim: Claim, now: datetime, s: Settings
           ) -> queries.Settlement:
    """Decide the message's next state from one attempt's result (the one visible branch)."""
    v = _unchanged(m, now)
    if isinstance(result, BaseException):
        v.update(status=UNKNOWN, error_code="internal_error", finished_at=now, key_exposed=True,
                 error=f"send raised {type(result).__name__}: {result}"[:500])
        return queries.Settlement(m.id, v, _attempt(m, claim, None, "unknown", "internal_error", v["error"], 0.0),
                                  claim.token)
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
        if outcome.ambiguous:
            v["key_exposed"] = True  # the provider may hold this key: every later attempt reuses it
        if outcome.ambiguous and _can_ask(m.provider):
            # The provider can say whether it has it (emnify's SMS list): the claim stays open for
            # the reaper, which asks once the request can no longer be in flight, and sends again
            # only if the message is provably absent (recovery.py).
            v.update(status=SENDING, claimed_by=liveness.ASK_PROVIDER, claimed_at=m.claimed_at,
                     error_code=outcome.code, error=f"answer lost ({outcome.message}); asking the provider"[:500])
            kind = "ambiguous"
        elif outcome.ambiguous and _unsafe_to_resend(m.provider, s):
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
            if not v["key_exposed"]:  # a definite failure: the provider dropped this key, a new one is sent
                v["attempt_key"] = str(uuid.uuid4())
    else:  # pragma: no cover - the Outcome union is closed
        raise TypeError(f"unknown outcome {outcome!r}")
    code = getattr(outcome, "code", None)
    detail = getattr(outcome, "message", None)
    return queries.Settlement(
        m.id, _fit(v), _attempt(m, claim, result.http_status, kind, code, detail, result.latency_ms), claim.token
    )


def _unsafe_to_resend(account: str, s: Settings) -> bool:
    """An ambiguous failure (the provider may have the message) must not be retried: the account
    asks for `on_timeout = "unknown"` and its kind cannot make a resend harmless."""
    acct = s.providers.get(account)
    if acct is None or acct.on_timeout != "unknown":
        return False
    return not runtime.adapter_for(account).idempotent_retry


def _can_ask(account: str) -> bool:
    """The kind can look a message up, and a resend under the same key would not do instead."""
    try:
        adapter = runtime.adapter_for(account)
    except Exception:  # noqa: BLE001 - an account removed from the config
        return False
    return adapter.has_lookup and not adapter.idempotent_retry


def _has_status(account: str) -> bool:
    try:
        return runtime.adapter_for(account).has_status
    except Exception:  # noqa: BLE001 - an account removed from the config: nothing to poll
        return False


_KEPT = ("status", "attempts", "due_at", "attempt_key", "key_exposed", "provider_ref", "provider_status", "segments",
         "cost", "cost_currency", "error_code", "error", "accepted_at", "finished_at")
_kept_of_row = itemgetter(*_KEPT)  # from a claimed row's mapping: a third of the cost of reading each attribute
_kept_of_object = attrgetter(*_KEPT)


def _unchanged(m: Message, now: datetime) -> dict:
    """The settlement's starting point: the message's columns as claimed, its claim let go."""
    mapping = getattr(m, "_mapping", None)
    v = dict(zip(_KEPT, _kept_of_row(mapping) if mapping is not None else _kept_of_object(m)))
    v["key_exposed"] = bool(v["key_exposed"])
    v["claimed_at"] = v["claimed_by"] = None
    v["updated_at"] = now
    return v


def _attempt(m: Message, claim: Claim, http_status: int | None, outcome: str, code: str | None,
             detail: str | None, latency_ms: float) -> dict:
    return {
        "message_id": m.id, "number": m.attempts, "started_at": claim.at, "http_status": http_status,
        "outcome": outcome, "provider_code": code and str(code)[:100], "detail": (detail or None) and detail[:500],
        "latency_ms": round(latency_ms, 2) if math.isfinite(latency_ms) else 0.0, "claim_token": claim.token,
        "worker": claim.worker, "attempt_key": m.attempt_key, "request_started": True,
    }


def _log_outcomes(claimed: Sequence[Message], settlements: Sequence[queries.Settlement]) -> None:
    metrics.sends_settled(claimed, settlements)
    info = log.isEnabledFor(logging.INFO)
    for m, st in zip(claimed, settlements):
        status = st.values["status"]
        level = logging.INFO if status in (ACCEPTED, QUEUED, SCHEDULED) else logging.WARNING
        if level == logging.INFO and not info:
            continue  # the masked number and the record's fields are not built for nothing
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
