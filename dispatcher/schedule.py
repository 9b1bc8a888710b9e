"""The beat tick: what waits in the store moves when its time comes.

Each tick runs these steps, each on its own: a step that fails is logged and counted, and the
others still run (one bad row never stops the beat's work for the rest). Every move is a
compare-and-set, so two beats, or a beat restarted mid-tick, never move a message twice.

* recurring: schedules store a message for each occurrence that has come (recurring.py);
* expire: waiting messages past `not_after` become `expired`;
* release: `scheduled` messages whose due time has come become `queued` and are published;
* recover: claims of workers whose heartbeat stopped, and claims past the lease, are settled
  (recovery.py: never-started ones are sent, the others asked about or `unknown`);
* lost tasks: queued messages whose task was lost are published again (recovery.py), at once
  for all of them when the broker's Redis lost its data.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Callable

from . import health, recovery, runtime
from .config import Settings
from .feeder import feed_campaigns
from .recurring import fire_due
from .store import queries
from .store.db import ensure_schema, session_scope
from .store.models import SCHEDULED, utcnow

log = logging.getLogger("dispatcher.schedule")
BATCH = 1000


@dataclass
class TickReport:
    recurring: int = 0  # occurrences of recurring schedules stored
    expired: int = 0
    released: int = 0
    requeued: int = 0  # queued messages published again (lost tasks)
    reaped_unknown: int = 0  # a dead worker's claims nobody can tell about
    reaped_retry: int = 0  # a dead worker's claims sent again (never started, or a harmless resend)
    reaped_found: int = 0  # a dead worker's claims the provider has
    failed_steps: list[str] = field(default_factory=list)

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
    steps: list[tuple[str, Callable[[], None]]] = [
        ("recurring", lambda: setattr(report, "recurring", fire_due(now))),
        ("expire", lambda: _expire(s, now, report)),
        ("release", lambda: _release(s, now, report, enqueue)),
        ("recover", lambda: _recover(s, now, report, enqueue)),
        ("lost tasks", lambda: _lost_tasks(s, now, report, enqueue)),
        ("campaigns", lambda: feed_campaigns(s, clock, enqueue)),  # as each account's limit allows (feeder.py)
    ]
    for name, step in steps:
        try:
            step()
        except Exception:  # noqa: BLE001 - one step's failure never stops the others
            log.exception("tick step %r failed; the other steps ran", name)
            report.failed_steps.append(name)
    if any(v for k, v in report.as_dict().items()):
        log.info("tick: %s", report.as_dict())
    return report


def _expire(s: Settings, now: datetime, report: TickReport) -> None:
    with session_scope(s.database_url) as db:
        report.expired = len(queries.expire_overdue(db, None, now))


def _release(s: Settings, now: datetime, report: TickReport, enqueue: Callable[[list[str], float], None]) -> None:
    while True:
        with session_scope(s.database_url) as db:
            released = queries.release(db, queries.due_ids(db, SCHEDULED, now, BATCH), now)
        if released:
            enqueue(released, 0.0)
            report.released += len(released)
        if len(released) < BATCH:
            break


def _recover(s: Settings, now: datetime, report: TickReport, enqueue: Callable[[list[str], float], None]) -> None:
    for done in (recovery.recover_dead_workers(s, now, enqueue), recovery.recover_expired_leases(s, now, enqueue)):
        report.reaped_retry += len(done.resent) + len(done.same_key)
        report.reaped_found += len(done.found)
        report.reaped_unknown += len(done.unknown)


def _lost_tasks(s: Settings, now: datetime, report: TickReport, enqueue: Callable[[list[str], float], None]) -> None:
    report.requeued = recovery.resync_if_broker_lost(s, now, enqueue) + recovery.requeue_lost(s, now, enqueue)
