"""`dispatcher health`: is Redis answering, is the store reachable, is the beat ticking?

The beat's tick (schedule.tick) records its time in Redis (`record_tick`, one SET per tick);
the beat is unhealthy when that time is more than BEAT_STALE (30 s) old, or was never recorded.
Each check returns a `Check` naming what is wrong in one line; nothing here prints a password.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

from . import keys
from .redact import hide_url_passwords
from .redis_client import shared

log = logging.getLogger("dispatcher.health")
BEAT_STALE = 30.0  # seconds without a tick after which the beat is unhealthy
TICK_TTL = 3600  # the record of the last tick outlives a stopped beat by an hour, then "never"
CHECKS = ("redis", "store", "beat")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def record_tick(redis_url: str, now: float | None = None) -> None:
    """Note that the beat's tick ran now (called by schedule.tick); a Redis failure is logged only."""
    try:
        shared(redis_url).set(keys.beat_tick(), repr(time.time() if now is None else now), ex=TICK_TTL)
    except Exception as exc:  # noqa: BLE001 - the tick's work matters more than its heartbeat
        log.warning("could not record the beat's tick: %s", type(exc).__name__)


def last_tick(redis_url: str) -> float | None:
    """When the tick last ran (seconds since epoch), None if never (or over an hour ago)."""
    raw = shared(redis_url).get(keys.beat_tick())
    return None if raw is None else float(raw)


def check_redis(redis_url: str) -> Check:
    try:
        shared(redis_url).ping()
    except Exception as exc:  # noqa: BLE001
        return Check("redis", False, f"not reachable at {hide_url_passwords(redis_url)} ({type(exc).__name__})")
    return Check("redis", True, "answers")


def check_store(database_url: str) -> Check:
    from sqlalchemy import text

    from .store.db import session_scope

    try:
        with session_scope(database_url) as db:
            db.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return Check("store", False, f"not reachable at {hide_url_passwords(database_url)} ({type(exc).__name__}: {reason})")
    return Check("store", True, "answers")


def check_beat(redis_url: str, clock: Callable[[], float] = time.time) -> Check:
    try:
        last = last_tick(redis_url)
    except Exception as exc:  # noqa: BLE001
        return Check("beat", False, f"its last tick cannot be read: Redis {type(exc).__name__}")
    if last is None:
        return Check("beat", False, "no tick recorded in the last hour: is `dispatcher beat` running?")
    age = clock() - last
    if age > BEAT_STALE:
        return Check("beat", False, f"last tick {age:.0f} s ago (more than {BEAT_STALE:.0f} s): is `dispatcher beat` running?")
    return Check("beat", True, f"last tick {max(age, 0.0):.1f} s ago")


def run(only: tuple[str, ...] = CHECKS, clock: Callable[[], float] = time.time) -> list[Check]:
    """Every check asked for, in CHECKS order. Settings come from the config and environment."""
    from . import runtime

    s = runtime.settings()
    results = []
    if "redis" in only:
        results.append(check_redis(s.redis_url))
    if "store" in only:
        results.append(check_store(s.database_url))
    if "beat" in only:
        redis_down = any(c.name == "redis" and not c.ok for c in results)
        results.append(Check("beat", False, "unknown: Redis, where the beat records its ticks, is not reachable")
                       if redis_down else check_beat(s.redis_url, clock))
    return results


def as_dict(results: list[Check]) -> dict:
    return {"healthy": all(c.ok for c in results), "checks": {c.name: asdict(c) for c in results}}
