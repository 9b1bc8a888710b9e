"""Recurring reminders: cron expressions in a schedule's own time zone, each occurrence sent once.

    add_schedule("standup", "0 9 * * 1-5", "Europe/London", "alerts", "+447700900123", "Stand-up in 5")
    list_schedules()      # with the next three occurrences, local and UTC
    remove_schedule("standup")

croniter walks the schedule's local wall-clock times; each is turned into an instant here:
* a local time that does not exist (spring forward) goes at the next valid instant, the end
  of the gap (01:30 on the last Sunday of March in London goes at 02:00 BST);
* a local time that occurs twice (fall back) is one wall-clock time, so it is sent once, at
  its first occurrence.
Each occurrence becomes a message whose idempotency key is "schedule:NAME:LOCALTIME", so however
many beats run, and across restarts, it is stored and sent once. An occurrence missed while
everything was down is sent late if it is within `schedule_grace` seconds, else skipped and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from sqlalchemy import select, update

from . import runtime
from .errors import InvalidOption, InvalidTime, NotFound, ValidationError
from .store.db import session_scope
from .store.models import Schedule, utcnow

log = logging.getLogger("dispatcher.recurring")
_FMT = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class Occurrence:
    local: datetime  # the wall-clock time the cron expression names (naive, in the schedule's zone)
    at: datetime  # the instant it is sent (UTC)


@dataclass(frozen=True)
class ScheduleView:
    name: str
    cron: str
    tz: str
    provider: str
    to: str
    text: str | None
    until: datetime | None
    upcoming: tuple[Occurrence, ...]


def instant_of(local: datetime, zone: ZoneInfo) -> datetime:
    """The instant a local wall-clock time names: its first occurrence, or the end of a DST gap."""
    candidate = local
    for _ in range(24 * 60):  # a gap is never a day long
        aware = candidate.replace(tzinfo=zone, fold=0)
        instant = aware.astimezone(timezone.utc)
        if instant.astimezone(zone).replace(tzinfo=None) == candidate:
            return instant
        candidate = (candidate + timedelta(minutes=1)).replace(second=0, microsecond=0)
    raise ValueError(f"no valid instant near {local} in {zone}")  # pragma: no cover


def occurrences(cron: str, zone: ZoneInfo, after_local: datetime) -> Iterator[Occurrence]:
    """Every occurrence strictly after the local wall-clock time `after_local`."""
    it = croniter(cron, after_local)
    while True:
        local = it.get_next(datetime)
        yield Occurrence(local, instant_of(local, zone))


def add_schedule(name: str, cron: str, tz: str, provider: str, to: str, text: str | None = None, *,
                 until: datetime | None = None, clock: Callable[[], datetime] = utcnow, **options: Any) -> ScheduleView:
    """Create a recurring reminder; the message is validated now, as send() would."""
    from .api import build_row

    if not name or len(name) > 100:
        raise ValidationError("name", "must be 1 to 100 characters")
    if not croniter.is_valid(cron):
        raise InvalidOption("cron", f"not a valid cron expression: {cron!r}")
    zone = _zone(tz)
    if until is not None and (until.tzinfo is None or until.utcoffset() is None):
        raise InvalidTime("until", "must be timezone-aware")
    build_row(provider, to, text, options=options)  # the same checks as send(), nothing stored
    now = clock()
    with runtime.session() as db:
        if db.get(Schedule, name) is not None:
            raise ValidationError("name", f"a schedule named {name!r} exists already")
        db.add(Schedule(name=name, cron=cron, tz=tz, provider=provider, to=to, text=text, options=options,
                        until=until, cursor=now.astimezone(zone).replace(tzinfo=None).strftime(_FMT), created_at=now))
    return _view(get_schedule(name), now)


def get_schedule(name: str) -> Schedule:
    with runtime.session() as db:
        return _find(db, name)


def list_schedules(clock: Callable[[], datetime] = utcnow) -> list[ScheduleView]:
    with runtime.session() as db:
        rows = list(db.execute(select(Schedule).order_by(Schedule.name)).scalars())
    now = clock()
    return [_view(row, now) for row in rows]


def remove_schedule(name: str) -> None:
    with runtime.session() as db:
        db.delete(_find(db, name))


def _find(db: Any, name: str) -> Schedule:
    row = db.get(Schedule, name)
    if row is None:
        raise NotFound(f"no schedule named {name!r}")
    return row


def fire_due(now: datetime, send: Callable[..., Any] | None = None) -> int:
    """Store a message for every occurrence that has come (the beat tick calls this); returns how many."""
    from . import api

    send = send or api.send
    s = runtime.settings()
    with session_scope(s.database_url) as db:
        rows = list(db.execute(select(Schedule)).scalars())
    sent = 0
    for row in rows:
        zone = ZoneInfo(row.tz)
        cursor = row.cursor
        for occ in occurrences(row.cron, zone, datetime.strptime(row.cursor, _FMT)):
            if occ.at > now or (row.until is not None and occ.at > row.until):
                break
            cursor = occ.local.strftime(_FMT)
            if (now - occ.at).total_seconds() > s.schedule_grace:
                log.warning("schedule %s: occurrence %s (%s) missed by more than %.0fs; skipped", row.name,
                            cursor, occ.at.isoformat(), s.schedule_grace)
                continue
            send(row.provider, row.to, row.text, not_before=occ.at, idempotency_key=f"schedule:{row.name}:{cursor}",
                 **dict(row.options or {}))
            sent += 1
        if cursor != row.cursor:
            with session_scope(s.database_url) as db:  # compare-and-set: another beat may have moved it
                db.execute(update(Schedule).where(Schedule.name == row.name, Schedule.cursor == row.cursor)
                           .values(cursor=cursor))
    return sent


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidOption("tz", f"not a known time zone: {tz!r} (e.g. Europe/London)") from None


def _view(row: Schedule, now: datetime) -> ScheduleView:
    zone = ZoneInfo(row.tz)
    start = max(now, row.created_at).astimezone(zone).replace(tzinfo=None)
    upcoming = []
    for occ in occurrences(row.cron, zone, start):
        if row.until is not None and occ.at > row.until or len(upcoming) == 3:
            break
        upcoming.append(occ)
    return ScheduleView(row.name, row.cron, row.tz, row.provider, row.to, row.text, row.until, tuple(upcoming))
