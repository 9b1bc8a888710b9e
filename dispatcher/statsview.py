"""`dispatcher stats`: per account, what waits, what was sent in the last minute, what holds it back.

A snapshot joins three sources, each the truth for its part: the store (messages waiting by
status, the age of the oldest due one: backlog.py), the activity counts every worker adds to
Redis (attempts by outcome over the last 60 s: activity.py), and the rate limiter (the
account's limit and any pause its provider asked for). `--once --json` prints one snapshot for
scripts; without `--once` a live table (rich) is redrawn every `--interval` seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable

from . import activity, backlog, runtime

WINDOW = 60  # seconds of activity a snapshot sums
OUTCOMES = ("accepted", "rejected", "retried", "throttled", "deferred", "unknown", "failed", "expired")


def snapshot(clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """One reading of every configured account (and any other with waiting messages)."""
    s = runtime.settings()
    now = clock()
    with runtime.session() as db:
        waiting = backlog.read(db, datetime.fromtimestamp(now, timezone.utc))
    recent, span = activity.recent(s.redis_url, WINDOW, clock)
    limiter = runtime.limiter()
    accounts: dict[str, Any] = {}
    for name in sorted(set(s.providers) | set(waiting) | set(recent)):
        b = waiting.get(name, backlog.Backlog())
        counts = recent.get(name, {})
        sent = sum(counts.get(o, 0) for o in OUTCOMES if o != "deferred")
        rate = s.providers[name].rate_limit if name in s.providers else None
        paused = limiter.paused_until(name)
        accounts[name] = {
            "limit": str(rate) if rate else None,
            "waiting": dict(b.depth),
            "oldest_due_age": round(b.oldest_due_age, 1),
            "recent": {o: counts.get(o, 0) for o in OUTCOMES},
            "send_rate": round(sent / span, 2),  # attempts per second over the window
            "failures": sum(counts.get(o, 0) for o in ("rejected", "unknown", "failed", "expired")),
            "paused_for": round(paused - now, 1) if paused and paused > now else 0.0,
        }
    return {"time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "window_seconds": round(span, 1), "accounts": accounts}


def table(snap: dict[str, Any]) -> Any:
    """The snapshot as a rich Table."""
    from rich.table import Table

    t = Table(title=f"dispatcher  {snap['time']}  (counts over the last {snap['window_seconds']:.0f} s)",
              title_justify="left")
    for col in ("account", "limit", "sched", "queued", "sending", "oldest", "sent/s", "ok", "retry", "thrott",
                "fail", "paused"):
        t.add_column(col, justify="left" if col in ("account", "limit") else "right")
    for name, a in snap["accounts"].items():
        lm = a["recent"]
        throttled = lm["throttled"] + lm["deferred"]
        failures = a["failures"]
        t.add_row(
            name, a["limit"] or "-", str(a["waiting"]["scheduled"]), str(a["waiting"]["queued"]),
            str(a["waiting"]["sending"]), _age(a["oldest_due_age"]), f"{a['send_rate']:.1f}", str(lm["accepted"]),
            str(lm["retried"]), f"[yellow]{throttled}[/]" if throttled else "0",
            f"[red]{failures}[/]" if failures else "0",
            f"[yellow]{a['paused_for']:.0f} s[/]" if a["paused_for"] else "-",
        )
    return t


def _age(seconds: float) -> str:
    if seconds < 1:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def live(interval: float = 2.0) -> None:
    """Redraw the table every `interval` seconds until Ctrl-C."""
    from rich.live import Live

    with Live(table(snapshot()), refresh_per_second=4, screen=False) as view:
        while True:
            time.sleep(interval)
            view.update(table(snapshot()))
