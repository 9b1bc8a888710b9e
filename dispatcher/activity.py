"""Recent activity per account, shared by every worker on every machine: counts in Redis.

The send path adds what each batch did (accepted, rejected, retried, throttled, unknown,
failed, expired, deferred by the rate limiter) to a hash per 10-second bucket, in one pipelined
round trip per batch; `dispatcher stats` sums the last minute's buckets into rates. Buckets
expire after 15 minutes. Losing a count (Redis briefly unreachable) only makes a rate shown a
little low: nothing here is the truth about a message, the store is.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Callable

from . import keys
from .redis_client import shared

log = logging.getLogger("dispatcher.activity")
BUCKET = 10  # seconds per bucket
KEEP = 900  # seconds a bucket lives


def bucket_of(at: float) -> int:
    return int(at // BUCKET)


def add(counts: Counter[tuple[str, str]], redis_url: str, clock: Callable[[], float] = time.time) -> None:
    """Add {(account, what): n} to the current bucket; a Redis failure is logged, not raised."""
    if not counts:
        return
    key = keys.activity(bucket_of(clock()))
    try:
        pipe = shared(redis_url, timeout=0.5).pipeline(transaction=False)  # never hold up a batch's record
        for (account, what), n in counts.items():
            pipe.hincrby(key, f"{account}|{what}", n)
        pipe.expire(key, KEEP)
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - a count lost is a rate shown low, never a message lost
        log.debug("activity counts not recorded: %s", exc)


def recent(redis_url: str, seconds: int = 60, clock: Callable[[], float] = time.time
           ) -> tuple[dict[str, Counter[str]], float]:
    """({account: {what: count}}, the seconds those counts cover): the current bucket and the
    whole ones before it back to `seconds` ago, so a count shows at once and the span is exact."""
    now = clock()
    first = bucket_of(now - seconds) + 1
    pipe = shared(redis_url).pipeline(transaction=False)
    for b in range(first, bucket_of(now) + 1):
        pipe.hgetall(keys.activity(b))
    totals: dict[str, Counter[str]] = {}
    for fields in pipe.execute():
        for raw, n in fields.items():
            account, _, what = (raw.decode() if isinstance(raw, bytes) else raw).rpartition("|")
            totals.setdefault(account, Counter())[what] += int(n)
    return totals, max(now - first * BUCKET, 1.0)
