"""Retry policy: exponential backoff with jitter, bounded in count and in countdown length."""

from __future__ import annotations

import random


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    "Equal jitter": half of the exponential step is fixed, half random, so retries of a
    batch spread out but never come back at once nor wait near zero.
    """
    step = min(cap, base * (2 ** max(attempt - 1, 0)))
    r = rng or random
    return step / 2 + r.uniform(0, step / 2)
