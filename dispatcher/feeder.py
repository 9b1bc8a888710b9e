"""The campaign feeder: campaigns' pending messages go to the broker only as their account can take them.

A campaign's 200,000 messages never sit in the broker (design.md, "Campaigns are fed, not
flooded"). They wait in the store as `pending`; each feeder round hands to the broker, per
provider account, only what the account's limit lets go within a short look-ahead:

    room = slots free within LOOKAHEAD (rate limiter, Redis clock)  -  messages already queued

* Priority. A single send() goes straight to the broker; it counts in "already queued", so
  the feeder gives way, and it finds at most a look-ahead's worth of campaign messages ahead
  of it (LOOKAHEAD_SLOTS of the account's slots, at least LOOKAHEAD_MIN seconds). Those hold
  their rate-limit slots as bulk, which a single send may take until they are confirmed
  (ratelimit/strategy.py, "Priority"), so it does not wait for the look-ahead either.
* Fairness. The room of an account is split evenly between its running campaigns (the
  remainder rotates); what one campaign cannot use goes to the others.
* Windows. A row due but outside its window (read in its zone when it is released) is put off
  to the window's next opening; at the opening the rows go as the limit allows, not at once.
* The limit itself is still the dispatch's (admit() reserves each send's instant); the feeder
  only keeps the broker short. Accounts without a limit keep at most UNLIMITED_BACKLOG queued.

Rounds run every FEED_INTERVAL (0.1 s), more often than the beat tick (1 s): `feed_campaigns`,
one step of schedule.tick, runs rounds for about one tick and returns early when no campaign
has anything due. A Redis lock spaces rounds FEED_INTERVAL apart across every beat and worker,
and never lets two run at once; the compare-and-set release would keep a message from being
released twice anyway.

Each round also settles campaigns: a cancelled one's stragglers end `cancelled`, a paused one's
messages that came back to the queue (a retry) return to `pending`, a campaign past its
not_after expires what still waits, and one with nothing left to send is `done`. A campaign
still `loading` whose loader has been silent for campaigns.LOADER_TIMEOUT (its process died)
becomes `interrupted`.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Callable, Sequence

from . import keys, runtime
from .beatlock import BeatLock
from .config import Settings
from .errors import BrokerUnavailable
from .ratelimit import RateLimiterUnavailable
from .store import campaign_queries as cq
from .store.db import ensure_schema, session_scope
from .store.models import CANCELLED, DONE, EXPIRED, PAUSED, PENDING, QUEUED, RUNNING, utcnow
from .window import Window, parse_window, zones_for_number

log = logging.getLogger("dispatcher.feeder")
FEED_INTERVAL = 0.1  # seconds between rounds, across every process
LOOKAHEAD_SLOTS = 2  # a round fills the account's slots this far ahead...
LOOKAHEAD_MIN = 0.2  # ...and at least this many seconds (a fast account needs more than 2 slots of lead)
UNLIMITED_BACKLOG = 500  # queued messages kept in the broker for an account with no limit
WINDOW_BATCH = 500  # due rows of a windowed campaign read at once to find those inside their window
ROUND_LOCK_MS = 5000  # the round lock outlives a round stuck this long
_warned: set[str] = set()  # accounts missing from the config, already logged


@dataclass
class FeedReport:
    rounds: int = 0
    released: int = 0
    cancelled: int = 0  # stragglers of cancelled campaigns
    expired: int = 0
    done: list[str] = field(default_factory=list)  # campaigns found finished
    interrupted: list[str] = field(default_factory=list)  # campaigns whose loader was found dead
    by_campaign: Counter = field(default_factory=Counter)  # campaign id -> messages released
    idle: bool = False  # nothing was due: no campaign can use more right now

    def add(self, other: "FeedReport") -> None:
        self.rounds += other.rounds
        self.released += other.released
        self.cancelled += other.cancelled
        self.expired += other.expired
        self.done += other.done
        self.interrupted += other.interrupted
        self.by_campaign.update(other.by_campaign)
        self.idle = other.idle


def feed_campaigns(
    settings: Settings | None = None,
    clock: Callable[[], datetime] = utcnow,
    enqueue: Callable[[list[str], float], None] | None = None,
    *,
    duration: float | None = None,
) -> FeedReport:
    """The beat tick's step: feed rounds every FEED_INTERVAL for about `duration` seconds
    (default: one tick), returning early when nothing is due. Never raises for a campaign's
    trouble: it is logged, and the next round tries again."""
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    total = FeedReport()
    from .campaigns import interrupt_stale_loads

    with session_scope(s.database_url) as db:
        total.interrupted = interrupt_stale_loads(db, clock())
        if not cq.active(db):
            total.idle = True
            return total
    if enqueue is None:
        from .queue import enqueue as enqueue_ids

        enqueue = enqueue_ids
    deadline = time.monotonic() + (s.tick_seconds if duration is None else duration)
    while True:
        try:
            with _RoundLock(s) as mine:
                if mine:
                    report = feed_round(s, clock(), enqueue)
                    total.add(report)
                    if report.idle:
                        break
        except RateLimiterUnavailable as exc:
            log.warning("campaign feeder: Redis unreachable (%s); campaigns wait", exc)
            break
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(FEED_INTERVAL / 2, left))
    if total.released or total.cancelled or total.expired or total.done or total.interrupted:
        log.info("campaign feeder: %d round(s), released %d (%s), cancelled %d, expired %d, done %s, interrupted %s",
                 total.rounds, total.released, dict(total.by_campaign), total.cancelled, total.expired, total.done,
                 total.interrupted)
    return total


def feed_round(
    s: Settings,
    now: datetime,
    enqueue: Callable[[list[str], float], None],
) -> FeedReport:
    """One round: settle campaigns, then release what each account has room for, and enqueue it."""
    from .campaigns import interrupt_stale_loads

    report = FeedReport(rounds=1)
    with session_scope(s.database_url) as db:
        report.interrupted = interrupt_stale_loads(db, now)  # loads whose process died
        campaigns = cq.active(db)
    running = [c for c in campaigns if _settle(s, c, now, report)]
    if not running:
        report.idle = True
        return report
    by_account: dict[str, list[Any]] = {}
    for c in running:
        by_account.setdefault(c.provider, []).append(c)
    horizon = max(_lookahead(s, account) for account in by_account)
    with session_scope(s.database_url) as db:
        backlog = cq.queued_backlog(db, list(by_account), now + timedelta(seconds=horizon))
    released: list[str] = []
    busy = False
    exhausted: list[Any] = []
    for account, group in by_account.items():
        try:
            room = _room(s, account, backlog.get(account, 0))
        except RateLimiterUnavailable as exc:
            log.warning("campaign feeder: rate limiter unreachable for %s (%s); its campaigns wait", account, exc)
            continue
        if room <= 0:
            busy = True  # the account is at its limit: its campaigns wait for the next round
            continue
        with session_scope(s.database_url) as db:
            got = _release_shares(db, group, room, now)
        for c in group:
            n = got.get(c.id, 0)
            released += got.ids[c.id]
            if n:
                report.by_campaign[c.id] += n
                busy = True
            if got.exhausted.get(c.id):
                exhausted.append(c)
    report.released = len(released)
    if released:
        _enqueue(released, s, enqueue)
    for c in exhausted:
        _finish_if_done(s, c, now, report)
    report.idle = not busy
    return report


# --------------------------------------------------------------------------- settling campaigns
def _settle(s: Settings, c: Any, now: datetime, report: FeedReport) -> bool:
    """Keep a campaign's messages in line with its state; True when it may have messages released."""
    try:
        if c.state == CANCELLED:
            from .campaigns import sweep_cancelled

            report.cancelled += sweep_cancelled(c.id, now)
            _finish_if_done(s, c, now, report)
            return False
        if c.not_after is not None and c.not_after < now:
            with session_scope(s.database_url) as db:
                report.expired += cq.move(db, c.id, [PENDING], {
                    "status": EXPIRED, "error_code": "expired", "error": "the campaign's not_after passed before it could be sent",
                    "finished_at": now, "updated_at": now})
            _finish_if_done(s, c, now, report)
            return False
        if c.state == PAUSED:
            with session_scope(s.database_url) as db:  # a retry that came back to the queue waits with the rest
                cq.move(db, c.id, [QUEUED], cq.back_to_pending(c.created_at, now))
            return False
        return c.state == RUNNING and (c.not_before is None or c.not_before <= now)
    except Exception:  # noqa: BLE001 - one campaign's trouble never stops the others
        log.exception("campaign feeder: could not settle campaign %s", c.id)
        return False


def _finish_if_done(s: Settings, c: Any, now: datetime, report: FeedReport) -> None:
    """A loaded campaign with nothing waiting or being sent is finished (done, or cancelled for good).
    A cancelled one need not be loaded: its loader, if any is alive, stores no further chunk."""
    if c.loaded_at is None and c.state != CANCELLED:
        return
    with session_scope(s.database_url) as db:
        if cq.has_any(db, c.id, cq.UNSETTLED_STATUSES):
            return
        values = {"finished_at": now, "updated_at": now}
        if c.state == RUNNING or (c.state == PAUSED and c.not_after is not None and c.not_after < now):
            values["state"] = DONE
        if cq.set_campaign(db, c.id, [c.state], values):
            report.done.append(c.id)
            log.info("campaign %s %s", c.id, values.get("state", c.state))


# --------------------------------------------------------------------------- room and release
def _lookahead(s: Settings, account: str) -> float:
    acct = s.providers.get(account)
    rate = acct.rate_limit if acct is not None else None
    if rate is None:
        return LOOKAHEAD_MIN
    return max(LOOKAHEAD_SLOTS * rate.period / rate.count, LOOKAHEAD_MIN)


def _room(s: Settings, account: str, backlog: int) -> int:
    """How many more of the account's messages the broker should hold now."""
    acct = s.providers.get(account)
    if acct is None:
        if account not in _warned:  # once per process: the feeder asks ten times a second
            _warned.add(account)
            log.warning("campaign feeder: account %s is not configured; its campaigns wait", account)
        return 0
    d = runtime.limiter().describe(account, acct.rate_limit)
    if d["paused_until"]:
        return 0  # the provider asked for a pause: nothing more until it ends
    if acct.rate_limit is None:
        return max(0, UNLIMITED_BACKLOG - backlog)
    per_second = acct.rate_limit.count / acct.rate_limit.period
    horizon = _lookahead(s, account)
    next_free = float(d["next_free_in"])  # the instants before it are reserved already
    slots = max(0, math.ceil((horizon - next_free) * per_second - 1e-9))  # free instants in [next_free, horizon)
    return max(0, slots - backlog)


class _Released(dict):
    """campaign id -> how many were released, with their ids and whether its due rows ran out."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, list[str]] = {}
        self.exhausted: dict[str, bool] = {}


def _release_shares(db: Any, group: Sequence[Any], room: int, now: datetime) -> _Released:
    """Split `room` evenly between an account's campaigns (the remainder rotates round by round);
    what one cannot use is offered to the others."""
    out = _Released()
    for c in group:
        out[c.id], out.ids[c.id], out.exhausted[c.id] = 0, [], False
    start = int(time.time() / FEED_INTERVAL) % len(group)
    order = list(group[start:]) + list(group[:start])
    left = room
    for turn in range(2):
        hungry = [c for c in order if not out.exhausted[c.id]]
        if not hungry or left <= 0:
            break
        base, extra = divmod(left, len(hungry))
        for i, c in enumerate(hungry):
            want = base + (1 if i < extra else 0)
            if want <= 0:
                continue
            ids = _release(db, c, want, now)
            out[c.id] += len(ids)
            out.ids[c.id] += ids
            left -= len(ids)
            if len(ids) < want:
                out.exhausted[c.id] = True
    return out


def _release(db: Any, c: Any, want: int, now: datetime) -> list[str]:
    """Release up to `want` of a campaign's due pending rows, in file order; rows outside their
    window are put off to its next opening instead (read WINDOW_BATCH at a time, so that a
    window closing on many due rows puts them off quickly)."""
    window = _window(c.window)
    released: list[str] = []
    for _ in range(4):  # rows put off make room for the next ones, a few times per round
        need = want - len(released)
        rows = cq.due_pending(db, c.id, now, need if window is None else max(need, WINDOW_BATCH))
        if not rows:
            break
        ready, later = _split_by_window(rows, window, now)
        for due, ids in later.items():
            cq.postpone(db, ids, due, now)
        released += cq.release(db, ready[:need], now)
        if len(released) >= want or not later:
            break
    return released


def _split_by_window(rows: Sequence[Any], window: Window | None, now: datetime) -> tuple[list[str], dict[datetime, list[str]]]:
    if window is None:
        return [r.id for r in rows], {}
    ready: list[str] = []
    later: dict[datetime, list[str]] = {}
    for r in rows:
        zones = (r.tz,) if r.tz else zones_for_number(r.to)
        opens = window.next_open(now, zones) if zones else now
        if opens is None or opens <= now:
            ready.append(r.id)
        else:
            later.setdefault(opens, []).append(r.id)
    return ready, later


@lru_cache(maxsize=256)
def _window(text: str | None) -> Window | None:
    return parse_window(text) if text else None


def _enqueue(ids: list[str], s: Settings, enqueue: Callable[..., None]) -> None:
    """Hand released ids to the broker; if it is down they stay queued and the beat's sweep
    of lost tasks enqueues them later."""
    try:
        for start in range(0, len(ids), s.batch_size):
            enqueue(ids[start:start + s.batch_size], 0.0)
    except BrokerUnavailable as exc:
        log.warning("campaign feeder: released %d message(s) but could not enqueue them (%s); the beat will",
                    len(ids), exc)


# --------------------------------------------------------------------------- the round lock
class _RoundLock:
    """Take the right to run one round now: at most one round per FEED_INTERVAL across every
    process, never two at once. Yields False when another feeder holds it. The lock is kept
    FEED_INTERVAL after the round began (or given up, if the round took longer), only while this
    round still holds it: a round stuck past ROUND_LOCK_MS never shortens a newer round's lock."""

    def __init__(self, s: Settings) -> None:
        self.lock = BeatLock(s.redis_url, ttl=ROUND_LOCK_MS / 1000, key=keys.campaign_feeder_lock(),
                             token=uuid.uuid4().hex)
        self.started = 0.0
        self.mine = False

    def __enter__(self) -> bool:
        import redis

        self.started = time.monotonic()
        try:
            self.mine = self.lock.acquire()
        except redis.exceptions.RedisError as exc:
            raise RateLimiterUnavailable(str(exc)) from exc
        return self.mine

    def __exit__(self, *exc: object) -> None:
        import redis

        if not self.mine:
            return
        rest = FEED_INTERVAL - (time.monotonic() - self.started)
        try:
            if rest > 0.001:  # keep others off until FEED_INTERVAL after this round began
                self.lock.renew(rest)
            else:
                self.lock.release()
        except redis.exceptions.RedisError:
            pass  # it expires by itself
