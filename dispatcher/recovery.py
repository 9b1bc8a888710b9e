"""Recovery: settle the claims of dead workers, and publish again what the broker lost.

The beat tick (schedule.py) runs these; each is safe to run from several beats at once
(every move is a compare-and-set on the message's claim).

* `recover_dead_workers`: a worker whose heartbeat stopped (liveness.py) holds `sending`
  claims. (Not while this process's own heartbeat is failing: then the store was away, and
  every worker's silence says nothing until heartbeats have had time to resume.) Per claim, from the attempt record:
    - its request never started (`started_at` NULL)  -> `queued` again, no attempt counted;
      it is sent as if nothing happened;
    - its request may have started, kind with a harmless resend (esimfly's RT-RequestID,
      eSMS Africa's Idempotency-Key)                  -> `queued` with the SAME attempt key:
      the provider answers a duplicate with the first result;
    - may have started, kind that can look it up (`Adapter.lookup`, emnify's SMS list)
                                                      -> found: `accepted`; provably absent:
      `queued` again; cannot tell: asked again on later ticks, `unknown` after `lookup_patience`;
    - may have started, any other kind               -> `unknown` (error_code `worker_lost`),
      never re-sent automatically.
  Every queued message last published before the worker died is then published again: its
  task may have been among the dead worker's prefetched or countdown tasks.
* A claim left `sending` after an ambiguous answer on a kind that can look it up (held by
  liveness.ASK_PROVIDER, which never beats) is settled the same way: asked, then sent again
  only if provably absent.
* The lease (`lease_seconds`) is a backstop for claims whose worker still beats but whose
  record never came (the store refused it for minutes): settled the same way.
* `requeue_lost`: queued messages due and unpublished for `lost_after` are published again,
  and stamped, so a long backlog is re-published at most once per `lost_after`, not every tick.
* `resync_if_broker_lost`: Redis restarted without its data (a marker key is gone), so every
  queued message's task is gone: publish them all again, once.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from . import liveness, runtime, transport
from .config import Settings
from .providers.base import ABSENT, FOUND, LookupResult
from .redis_client import shared
from .store import queries
from .store.db import session_scope
from .store.models import ACCEPTED, FAILED, QUEUED, UNKNOWN, Message

log = logging.getLogger("dispatcher.recovery")
BATCH = 1000
LOOKUP_PATIENCE = 30.0  # seconds a dead worker's claim may wait for a provider lookup that cannot tell yet
Enqueue = Callable[[list[str], float], None]


@dataclass
class Recovered:
    """What recovery did in one tick."""

    resent: list[str] = field(default_factory=list)  # never started: queued again
    same_key: list[str] = field(default_factory=list)  # may have started, resend is harmless: queued with its key
    found: list[str] = field(default_factory=list)  # the provider has it: accepted
    unknown: list[str] = field(default_factory=list)  # nobody can tell: unknown
    failed: list[str] = field(default_factory=list)  # provably never arrived, attempts used up: failed
    waiting: list[str] = field(default_factory=list)  # lookup could not tell yet: asked again next tick


def recover_dead_workers(s: Settings, now: datetime, enqueue: Enqueue) -> Recovered:
    """Settle every claim of every dead worker, then publish again what it may have held."""
    done = Recovered()
    liveness.ensure_alive(s.database_url, s.heartbeat_seconds)  # the guard below needs this process's own
    if liveness.own_heartbeat_stale(s.database_url, 2 * s.heartbeat_seconds + 1.0,
                                    s.worker_timeout + s.heartbeat_seconds):
        log.warning("this process could not write its own heartbeat lately (the store was away?): no worker is "
                    "taken for dead until heartbeats have had time to resume")
        return done
    with session_scope(s.database_url) as db:
        dead = liveness.dead_workers(db, now, s.worker_timeout)
    for worker in dead:
        seen: set[str] = set()
        while True:
            with session_scope(s.database_url) as db:
                claims = [m for m in queries.claims_of(db, worker, BATCH) if m.id not in seen]
            if not claims:  # all settled (or left for a later tick: a lookup that cannot tell yet)
                break
            seen.update(m.id for m in claims)
            if worker == liveness.ASK_PROVIDER:
                _settle_claims(claims, s, now, enqueue, done, reason="its answer was lost")
                continue
            log.warning("worker %s stopped beating with %d claim(s); settling them", worker, len(claims))
            _settle_claims(claims, s, now, enqueue, done, reason="its worker stopped")
        with session_scope(s.database_url) as db:
            if not queries.claims_of(db, worker, 1):
                liveness.forget(db, worker, now, s.worker_timeout)
    if [w for w in dead if w != liveness.ASK_PROVIDER]:
        # The dead worker may have held tasks it had not run yet (prefetched, or counting down):
        # publish again every queued message last published before it was declared dead.
        _publish_again(s, now, now, None, enqueue)
    return done


def recover_expired_leases(s: Settings, now: datetime, enqueue: Enqueue) -> Recovered:
    """Claims older than the lease, whoever holds them: the backstop behind heartbeats."""
    done = Recovered()
    with session_scope(s.database_url) as db:
        claims = queries.stale_sending(db, now - timedelta(seconds=s.lease_seconds), BATCH)
    if claims:
        _settle_claims(claims, s, now, enqueue, done, reason="its claim outlived the lease")
    return done


def _settle_claims(claims: list[Message], s: Settings, now: datetime, enqueue: Enqueue, done: Recovered,
                   reason: str) -> None:
    unstarted = [m for m in claims if m.started_at is None]
    started = [m for m in claims if m.started_at is not None]
    lookups = {m.id: _look_up(m, s, now) for m in started if _can_look_up(m)}
    with session_scope(s.database_url) as db:
        for m in unstarted:  # unless its (live after all) worker records a start meanwhile
            if queries.hand_back(db, [m.id], m.claim_token, now, now, unstarted_only=True):
                done.resent.append(m.id)
        for m in started:
            verdict = lookups.get(m.id)
            if verdict is not None and verdict.state == FOUND and verdict.accepted is not None:
                _move(db, m, now, "found at the provider", {
                    "status": ACCEPTED, "provider_ref": verdict.accepted.provider_ref,
                    "provider_status": verdict.accepted.provider_status, "accepted_at": now,
                    "due_at": now if _has_status(m) else None, "error_code": None, "error": None}, done.found)
            elif verdict is not None and verdict.state == ABSENT and m.attempts >= s.max_attempts:
                _move(db, m, now, "not at the provider; attempts used up", {
                    "status": FAILED, "finished_at": now, "error_code": m.error_code or "worker_lost",
                    "error": f"gave up after {m.attempts} attempts; the provider never got it"}, done.failed)
            elif (verdict is not None and verdict.state == ABSENT) or _resend_is_harmless(m):
                how = "not at the provider: sent again" if verdict is not None else "resent with the same attempt key"
                _move(db, m, now, how, {"status": QUEUED, "due_at": now, "enqueued_at": now,
                                         "error_code": "worker_lost", "error": f"{reason}; {how}"}, done.same_key)
            elif verdict is not None and not _lookup_given_up(m, now, s):
                done.waiting.append(m.id)
            else:
                _move(db, m, now, "unknown", {
                    "status": UNKNOWN, "finished_at": now, "error_code": "worker_lost",
                    "error": f"{reason} after its request may have reached the provider, which cannot tell "
                             "whether it arrived; not re-sent automatically"}, done.unknown)
    again = done.resent + done.same_key
    if again:
        enqueue(again, 0.0)
    for name in ("resent", "same_key", "found", "unknown", "failed"):
        ids = getattr(done, name)
        if ids:
            log.warning("recovered %d claim(s) (%s): %s", len(ids), name, ",".join(ids[:50]))


def _move(db, m: Message, now: datetime, how: str, values: dict, into: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Settle one started claim of a dead worker and log the lost attempt against it."""
    values = dict(values, claimed_at=None, claimed_by=None, key_exposed=True, updated_at=now, started_at=None)
    if queries.set_claim(db, m.id, m.claim_token, values):
        into.append(m.id)
        if m.claimed_by == liveness.ASK_PROVIDER:
            return  # its attempt is logged already, with the answer that was lost
        queries.add_attempt(db, {
            "message_id": m.id, "number": m.attempts, "started_at": m.claimed_at or now, "http_status": None,
            "outcome": "worker_lost", "provider_code": None, "latency_ms": 0.0, "claim_token": m.claim_token,
            "worker": m.claimed_by, "attempt_key": m.attempt_key, "request_started": True,
            "detail": f"its worker died after the request may have started; {how}",
        })


def _adapter(m: Message):  # type: ignore[no-untyped-def]
    try:
        return runtime.adapter_for(m.provider)
    except Exception:  # noqa: BLE001 - an account removed from the config: nothing can be asked
        log.warning("message %s: account %r is not configured; its claim cannot be looked up", m.id, m.provider)
        return None


def _resend_is_harmless(m: Message) -> bool:
    adapter = _adapter(m)
    return adapter is not None and adapter.idempotent_retry


def _has_status(m: Message) -> bool:
    adapter = _adapter(m)
    return adapter is not None and adapter.has_status


def _can_look_up(m: Message) -> bool:
    adapter = _adapter(m)
    return adapter is not None and not adapter.idempotent_retry and adapter.has_lookup


def _look_up(m: Message, s: Settings, now: datetime) -> LookupResult:
    """Ask the provider whether a dead worker's request arrived. Not before the request's own
    timeout has passed since it started (until then "absent" may only mean "not yet")."""
    from .dispatch import outbound

    adapter = runtime.adapter_for(m.provider)
    since = m.started_at or m.claimed_at or now
    if (now - since).total_seconds() < float(adapter.account.timeout) + 1.0:
        return LookupResult.cannot_tell("the request may still be in flight")
    try:
        return transport.run(lambda: adapter.lookup(transport.process_loop().client(), outbound(m), since))
    except Exception as exc:  # noqa: BLE001 - asked again next tick, until LOOKUP_PATIENCE
        log.warning("message %s: looking it up at %s failed (%s)", m.id, m.provider, type(exc).__name__)
        return LookupResult.cannot_tell(f"the lookup failed ({type(exc).__name__})")


def _lookup_given_up(m: Message, now: datetime, s: Settings) -> bool:
    started = m.started_at or m.claimed_at or now
    return (now - started).total_seconds() > s.worker_timeout + LOOKUP_PATIENCE


def requeue_lost(s: Settings, now: datetime, enqueue: Enqueue) -> int:
    """Publish again queued messages due and unpublished for `lost_after` (their task was lost)."""
    before = now - timedelta(seconds=s.lost_after)
    return _publish_again(s, now, before, before, enqueue)


def resync_if_broker_lost(s: Settings, now: datetime, enqueue: Enqueue) -> int:
    """If the broker's Redis lost its data since the last tick, publish every queued message again."""
    import redis

    from . import keys

    client = shared(s.redis_url)
    try:
        lost = bool(client.set(keys.broker_epoch(), uuid.uuid4().hex, nx=True))
    except redis.exceptions.RedisError as exc:
        log.warning("cannot check the broker's Redis (%s); queued messages wait for it", type(exc).__name__)
        return 0
    if not lost:
        return 0
    count = _publish_again(s, now, now + timedelta(seconds=1), None, enqueue)
    if count:
        log.warning("the broker's Redis lost its data (restarted without persistence?): published %d queued "
                    "message(s) again", count)
    return count


def _publish_again(s: Settings, now: datetime, published_before: datetime, due_before: datetime | None,
                   enqueue: Enqueue) -> int:
    """Publish queued messages last published before `published_before`, stamping each so it is
    published once per sweep; a message not yet due goes with its remaining countdown."""
    total = 0
    while True:
        with session_scope(s.database_url) as db:
            rows = queries.lost_queued(db, published_before, due_before, BATCH)
            queries.stamp_enqueued(db, [mid for mid, _ in rows], now)
        by_delay: dict[float, list[str]] = {}
        for mid, due in rows:
            delay = 0.0 if due is None else min(max((due - now).total_seconds(), 0.0), 60.0)
            by_delay.setdefault(round(delay, 1), []).append(mid)
        for delay, ids in by_delay.items():
            enqueue(ids, delay)
        total += len(rows)
        if len(rows) < BATCH:
            return total
