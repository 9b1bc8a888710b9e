"""The beat tick: what waits in the store moves when its time comes.

Each tick, in batches and with compare-and-set updates (so two beats, or a beat restarted
mid-tick, never release a message twice):

* recurring schedules store a message for each occurrence that has come (recurring.py);
* waiting messages past `not_after` become `expired`;
* `scheduled` messages whose due time has come become `queued` and are enqueued;
* `queued` messages whose task was lost (broker flushed, Redis down at send time) are
  enqueued again: harmless, the claim makes a duplicate task send nothing;
* `sending` claims older than the lease (a worker died mid-request) are settled: kinds
  whose resend is idempotent (a reused request id / Idempotency-Key) go back to `queued`
  with the same attempt key; the others become `unknown`, never re-sent blindly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Callable

from . import health, runtime
from .config import Settings
from .recurring import fire_due
from .store import queries
from .store.db import ensure_schema, session_scope
from .store.models import QUEUED, SCHEDULED, SENDING, UNKNOWN, utcnow

log = logging.getLogger("dispatcher.schedule")
BATCH = 1000
LOST_AFTER = timedelta(minutes=5)  # a queued message this far past due has lost its task


@dataclass
class TickReport:
    recurring: int = 0  # occurrences of recurring schedules stored
    expired: int = 0
    released: int = 0
    requeued: int = 0
    reaped_unknown: int = 0
    reaped_retry: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def tick(
    *,
    settings: Settings | None = None,
    clock: Callable[[], datetime] = utcnow,
    enqueue: Callable[[list[str], float], None] | None = None,
) -> TickReport:
    s = settings or runtime.settings()
    ensure_schema(s.database_url)
    if enqueue is None:
        from .queue import enqueue as enqueue_ids

        enqueue = enqueue_ids
    now = clock()
    health.record_tick(s.redis_url)  # `dispatcher health`: the beat is alive while this is fresh
    report = TickReport()
    report.recurring = fire_due(now)
    with session_scope(s.database_url) as db:
        report.expired = len(queries.expire_overdue(db, None, now))
    while True:
        with session_scope(s.database_url) as db:
            released = queries.release(db, queries.due_ids(db, SCHEDULED, now, BATCH), now)
        if released:
            enqueue(released, 0.0)
            report.released += len(released)
        if len(released) < BATCH:
            break
    with session_scope(s.database_url) as db:
        lost = queries.due_ids(db, QUEUED, now - LOST_AFTER, BATCH)
    if lost:
        enqueue(lost, 0.0)
        report.requeued = len(lost)
    _reap(s, now, report, enqueue)
    if report.recurring or report.released or report.expired or report.requeued or report.reaped_unknown or report.reaped_retry:
        log.info("tick: %s", report.as_dict())
    return report


def _reap(s: Settings, now: datetime, report: TickReport, enqueue: Callable[[list[str], float], None]) -> None:
    before = now - timedelta(seconds=s.lease_seconds)
    retry: list[str] = []
    with session_scope(s.database_url) as db:
        for m in queries.stale_sending(db, before, BATCH):
            try:
                idempotent = runtime.adapter_for(m.provider).idempotent_retry
            except Exception:  # noqa: BLE001 - an account removed from the config
                idempotent = False
            if idempotent and m.attempts < s.max_attempts:
                if queries.set_status(db, m.id, [SENDING], {"status": QUEUED, "claimed_at": None, "due_at": now,
                                                           "updated_at": now}):
                    retry.append(m.id)
            elif queries.set_status(
                db, m.id, [SENDING],
                {"status": UNKNOWN, "error_code": "lease_lost", "finished_at": now, "updated_at": now,
                 "error": "the worker sending it stopped mid-request; the provider cannot tell whether it "
                          "arrived, so it is not re-sent automatically"},
            ):
                report.reaped_unknown += 1
    if retry:
        enqueue(retry, 0.0)
        report.reaped_retry = len(retry)
