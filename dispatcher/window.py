"""Sending windows in the recipient's local time: "09:00-20:00" read in each recipient's zone.

    w = parse_window("09:00-20:00")
    zones = zones_for_number("+14155550123")      # ("America/Los_Angeles",)
    w.next_open(now, zones)                       # now if inside the window, else its next opening

A number's zones come from its prefix (phonenumbers' time-zone data, the longest matching
prefix). Some prefixes span several zones (a country-wide mobile range in Russia or
Australia): the message then goes only while the window is open in every one of them, so it
never reaches anyone outside it; zones with no common open hour make the row invalid (give a
`tz` column). A window whose end is before its start runs overnight ("21:00-06:00").
Local times skipped or repeated by a DST change are read as zoneinfo reads them (fold 0).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidTime, ValidationError

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_UNKNOWN_ZONE = "Etc/Unknown"
_DAYS_AHEAD = 3  # open intervals are computed for this many local days after today


@dataclass(frozen=True)
class Window:
    """Daily open hours [start, end) in local time; overnight when end <= start."""

    start: time
    end: time

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def next_open(self, now: datetime, zones: tuple[str, ...]) -> datetime | None:
        """`now` if the window is open in every zone, else the next instant it is (UTC).

        None when the zones never share an open instant.
        """
        intervals = _open_intervals(self, zones, now.astimezone(timezone.utc).date())
        i = bisect.bisect_right(intervals, (now,)) - 1  # the last interval starting at or before now
        if i >= 0 and intervals[i][1] > now:
            return now
        if i + 1 < len(intervals):
            return intervals[i + 1][0]
        return None

    def is_open(self, now: datetime, zones: tuple[str, ...]) -> bool:
        return self.next_open(now, zones) == now


def parse_window(text: str | Window | None) -> Window | None:
    """"HH:MM-HH:MM" -> Window; None stays None. Raises InvalidTime naming `window`."""
    if text is None or isinstance(text, Window):
        return text
    m = _WINDOW.match(str(text))
    if not m:
        raise InvalidTime("window", f"must look like 09:00-20:00 (HH:MM-HH:MM), got {text!r}")
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
        raise InvalidTime("window", f"hours run 00-23 and minutes 00-59, got {text!r}")
    start, end = time(h1, m1), time(0, 0) if h2 == 24 else time(h2, m2)
    if start == end:
        raise InvalidTime("window", f"start and end are the same time ({text!r}); leave --window out to send at any hour")
    return Window(start, end)


def zone(name: str) -> str:
    """A time zone name checked against the system's database; raises ValidationError naming `tz`."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValidationError("tz", f"unknown time zone {name!r} (an IANA name such as Europe/London)") from None
    return name


def zones_for_number(number: str) -> tuple[str, ...] | None:
    """The time zones of a phone number's prefix (E.164, '+' optional); None when unknown."""
    digits = number[1:] if number.startswith("+") else number
    if not digits.isdigit():
        return None
    return _zones_for_prefix(digits[:_longest_prefix()])


@lru_cache(maxsize=1)
def _longest_prefix() -> int:
    from phonenumbers.tzdata import TIMEZONE_LONGEST_PREFIX

    return int(TIMEZONE_LONGEST_PREFIX)


@lru_cache(maxsize=65536)
def _zones_for_prefix(digits: str) -> tuple[str, ...] | None:
    from phonenumbers.tzdata import TIMEZONE_DATA

    for length in range(len(digits), 0, -1):
        zones = TIMEZONE_DATA.get(digits[:length])
        if zones:
            known = tuple(z for z in zones if z != _UNKNOWN_ZONE)
            return known or None
    return None


@lru_cache(maxsize=4096)
def _open_intervals(window: Window, zones: tuple[str, ...], today: date) -> list[tuple[datetime, datetime]]:
    """The UTC intervals, from yesterday to a few days ahead, in which the window is open in every zone."""
    common: list[tuple[datetime, datetime]] | None = None
    for name in zones:
        mine = _zone_intervals(window, ZoneInfo(name), today)
        common = mine if common is None else _intersect(common, mine)
    return common or []


def _zone_intervals(window: Window, tz: ZoneInfo, today: date) -> list[tuple[datetime, datetime]]:
    out = []
    overnight = window.end <= window.start
    for offset in range(-2, _DAYS_AHEAD + 1):
        day = today + timedelta(days=offset)
        start = datetime.combine(day, window.start, tzinfo=tz).astimezone(timezone.utc)
        end_day = day + timedelta(days=1) if overnight else day
        end = datetime.combine(end_day, window.end, tzinfo=tz).astimezone(timezone.utc)
        if end > start:
            out.append((start, end))
    return out


def _intersect(a: list[tuple[datetime, datetime]], b: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out
