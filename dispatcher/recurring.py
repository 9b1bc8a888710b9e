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

A cron expression with no next date (30 February) is refused when the schedule is added. A
stored schedule that went bad since (no next date, its account removed from the config, a
required default gone from the account, a zone no longer known) is skipped by `fire_due` and
logged with its name (once per reason, not at every tick), and `list_schedules` shows it with
`broken` saying why; the other schedules go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from sqlalchemy import select, update

from . import runtime, storable
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
    broken: str | None = None  # why the beat skips this schedule; None when it is healthy


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

    if not isinstance(name, str) or not name or len(name) > 100:
        raise ValidationError("name", "must be 1 to 100 characters")
    storable.check_text("name", name)
    if not isinstance(cron, str) or len(cron) > 100 or not croniter.is_valid(cron):
        raise InvalidOption("cron", f"not a valid cron expression: {cron!r}")
    if not isinstance(tz, str):
        raise InvalidOption("tz", f"not a known time zone: {tz!r} (e.g. Europe/London)")
    zone = _zone(tz)
    if until is not None and (not isinstance(until, datetime) or until.tzinfo is None or until.utcoffset() is None):
        raise InvalidTime("until", "must be timezone-aware")
    build_row(provider, to, text, options=options)  # the same checks as send(), nothing stored
    now = clock()
    try:
        next(occurrences(cron, zone, now.astimezone(zone).replace(tzinfo=None)))
    except CroniterError:
        raise InvalidOption("cron", f"{cron!r} has no next date (a day that never comes, e.g. 30 February)") from None
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
    _reported.pop((runtime.settings().database_url, name), None)


def _find(db: Any, name: str) -> Schedule:
    row = db.get(Schedule, name)
    if row is None:
        raise NotFound(f"no schedule named {name!r}")
    return row


def fire_due(now: datetime, send: Callable[..., Any] | None = None) -> int:
    """Store a message for every occurrence that has come (the beat tick calls this); returns how many.

    Each schedule is handled on its own: one that fails is logged with its name and skipped,
    and its cursor keeps what it had done, so the others never wait on it.
    """
    from . import api

    send = send or api.send
    s = runtime.settings()
    with session_scope(s.database_url) as db:
        rows = list(db.execute(select(Schedule)).scalars())
    sent = 0
    for row in rows:
        progress = _Progress(row.cursor)
        try:
            _fire(row, now, s.schedule_grace, send, progress)
        except Exception as exc:  # noqa: BLE001 - one bad schedule never stops the others
            _report_broken((s.database_url, row.name), _why(row, exc), exc)
        else:
            _reported.pop((s.database_url, row.name), None)
        finally:
            sent += progress.sent
            if progress.cursor != row.cursor:
                with session_scope(s.database_url) as db:  # compare-and-set: another beat may have moved it
                    db.execute(update(Schedule).where(Schedule.name == row.name, Schedule.cursor == row.cursor)
                               .values(cursor=progress.cursor))
    return sent


@dataclass
class _Progress:
    cursor: str  # the last local time handled (sent or skipped as missed)
    sent: int = 0


def _fire(row: Schedule, now: datetime, grace: float, send: Callable[..., Any], progress: _Progress) -> None:
    """Send each occurrence of one schedule that has come, moving `progress` past each one handled."""
    zone = ZoneInfo(row.tz)
    for occ in occurrences(row.cron, zone, datetime.strptime(row.cursor, _FMT)):
        if occ.at > now or (row.until is not None and occ.at > row.until):
            break
        local = occ.local.strftime(_FMT)
        if (now - occ.at).total_seconds() > grace:
            log.warning("schedule %s: occurrence %s (%s) missed by more than %.0fs; skipped", row.name,
                        local, occ.at.isoformat(), grace)
            progress.cursor = local
            continue
        send(row.provider, row.to, row.text, not_before=occ.at, idempotency_key=f"schedule:{row.name}:{local}",
             **dict(row.options or {}))
        progress.cursor = local
        progress.sent += 1


_reported: dict[tuple[str, str], str] = {}  # (store, schedule name) -> the reason last logged: logged once


def _report_broken(key: tuple[str, str], reason: str, exc: BaseException) -> None:
    if _reported.get(key) == reason:
        return
    _reported[key] = reason
    name = key[1]
    expected = isinstance(exc, (ValidationError, CroniterError, ZoneInfoNotFoundError, ValueError))
    log.warning("schedule %s: skipped, it cannot fire: %s (fix it, or `dispatcher schedule remove %s`)",
                name, reason, name, exc_info=None if expected else exc)


def _why(row: Schedule, exc: BaseException) -> str:
    """One line saying what is wrong with a stored schedule."""
    if isinstance(exc, CroniterError):
        return f"its cron expression {row.cron!r} has no next date"
    if isinstance(exc, (ZoneInfoNotFoundError, ValueError)) and not isinstance(exc, ValidationError) \
            and not _known_zone(row.tz):
        return f"its time zone {row.tz!r} is not known"
    if isinstance(exc, ValidationError):
        return f"its message is no longer valid: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _known_zone(tz: str) -> bool:
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _zone(tz: str) -> ZoneInfo:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidOption("tz", f"not a known time zone: {tz!r} (e.g. Europe/London)") from None


def _view(row: Schedule, now: datetime) -> ScheduleView:
    """The schedule with its next three occurrences, or `broken` saying why it cannot fire."""
    from .api import build_row

    upcoming: list[Occurrence] = []
    try:
        zone = ZoneInfo(row.tz)
        start = max(now, row.created_at).astimezone(zone).replace(tzinfo=None)
        for occ in occurrences(row.cron, zone, start):
            if row.until is not None and occ.at > row.until or len(upcoming) == 3:
                break
            upcoming.append(occ)
        build_row(row.provider, row.to, row.text, options=dict(row.options or {}))  # still a valid message?
    except Exception as exc:  # noqa: BLE001 - shown, never raised: one bad row never hides the others
        return ScheduleView(row.name, row.cron, row.tz, row.provider, row.to, row.text, row.until, (),
                            _why(row, exc))
    return ScheduleView(row.name, row.cron, row.tz, row.provider, row.to, row.text, row.until, tuple(upcoming))
