"""Global, adaptive rate limits per provider account, shared by every worker through Redis.

    limiter = RateLimiter.from_url(settings.redis_url)
    r = limiter.reserve("alerts", account.rate_limit, n=200, max_wait=30.0)
    # send r.granted messages at r.delays (seconds from now), each no later than delay + r.slack
    # (a slot missed by more is forfeit: reserve again); put the rest back for r.retry_after
    limiter.learn("alerts", send_result.rate)   # a 429 / Retry-After pauses every worker

strategy.py holds the policy and explains the algorithm; storage.py the storage interface,
the Redis storage (reserve.lua, pause.lua) and an in-process stub for unit tests.
"""

from .storage import MemoryRateStorage, RateLimiterUnavailable, RateStorage, RedisRateStorage, SlotRule
from .strategy import RateLimiter, Reservation, rule_for, slack_for

__all__ = [
    "MemoryRateStorage",
    "RateLimiter",
    "RateLimiterUnavailable",
    "RateStorage",
    "RedisRateStorage",
    "Reservation",
    "SlotRule",
    "rule_for",
    "slack_for",
]
