"""Print how exact and how cheap the global rate limiter is, against a real Redis.

    .venv/bin/python bench/ratelimit_accuracy.py [--redis redis://127.0.0.1:6379/13] [--live]

1. Accuracy on paper: P processes reserve instants for one account in small batches; the
   most instants in any window of the limit's unit and the span against the ideal.
2. Cost: latency of one reserve() call (batch of 10) from one client.
3. --live: one asyncio loop actually sleeps until each instant of a 20/s account for 5 s and
   records when it woke; the most wake-ups in any 1 s window shows what the margin absorbs.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import multiprocessing
import os
import statistics
import time
import uuid

from dispatcher.config import parse_rate_limit
from dispatcher.ratelimit import RateLimiter

PREFIX = f"bench{uuid.uuid4().hex[:6]}"
CASES = [("20/s", 1.0, 400), ("8/s", 1.0, 160), ("2000/5m", 300.0, 5000), ("1000/h", 3600.0, 2500)]


def most_in_window(instants: list[float], length: float) -> int:
    ordered = sorted(instants)
    return max(bisect.bisect_right(ordered, t + length) - i for i, t in enumerate(ordered))


def reserve_share(url: str, prefix: str, account: str, rate_text: str, share: int, barrier, results) -> None:
    os.environ["DISPATCHER_REDIS_PREFIX"] = prefix
    limiter, rate = RateLimiter.from_url(url), parse_rate_limit(rate_text)
    barrier.wait()
    instants: list[float] = []
    while len(instants) < share:
        r = limiter.reserve(account, rate, min(10, share - len(instants)), max_wait=10 * share * rate.interval * 4)
        instants += r.instants
    results.put(instants)


def accuracy(url: str, processes: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    print(f"{'limit':>8} {'requests':>8} {'max in unit':>11} {'span s':>10} {'ideal s':>10} {'slower by':>9}")
    for rate_text, unit, total in CASES:
        barrier, results = ctx.Barrier(processes), ctx.Queue()
        account = f"acc-{uuid.uuid4().hex[:6]}"
        share = total // processes
        procs = [ctx.Process(target=reserve_share, args=(url, PREFIX, account, rate_text, share, barrier, results)) for _ in range(processes)]
        for p in procs:
            p.start()
        instants = [t for _ in procs for t in results.get()]
        for p in procs:
            p.join()
        rate = parse_rate_limit(rate_text)
        span, ideal = max(instants) - min(instants), (len(instants) - 1) * rate.interval
        print(f"{rate_text:>8} {len(instants):>8} {most_in_window(instants, unit):>11} {span:>10.2f} {ideal:>10.2f} {span / ideal - 1:>8.2%}")


def cost(url: str, calls: int = 2000) -> None:
    limiter, rate = RateLimiter.from_url(url), parse_rate_limit("2000/5m")
    account = f"cost-{uuid.uuid4().hex[:6]}"
    took = []
    for _ in range(calls):
        started = time.perf_counter()
        limiter.reserve(account, rate, 10, max_wait=3600)
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    print(f"reserve(10) on 2000/5m, log up to {calls * 10} entries: p50 {statistics.median(took):.3f} ms, p99 {took[int(calls * 0.99)]:.3f} ms")


async def live(url: str, seconds: float = 5.0) -> None:
    limiter, rate = RateLimiter.from_url(url), parse_rate_limit("20/s")
    account = f"live-{uuid.uuid4().hex[:6]}"
    woke: list[float] = []
    r = limiter.reserve(account, rate, int(seconds * 20), max_wait=seconds * 2)
    start = time.time()

    async def send_at(delay: float) -> None:
        await asyncio.sleep(delay)
        woke.append(time.time())

    await asyncio.gather(*(send_at(d) for d in r.delays))
    lateness = [w - (start + d) for w, d in zip(sorted(woke), r.delays)]
    print(
        f"live 20/s: {len(woke)} wake-ups over {max(woke) - min(woke):.2f} s, most in any 1 s: "
        f"{most_in_window(woke, 1.0)}, lateness max {max(lateness) * 1000:.1f} ms "
        f"({sum(late > r.slack for late in lateness)} beyond the {r.slack * 1000:.0f} ms slack)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default=os.environ.get("DISPATCHER_REDIS_URL", "redis://127.0.0.1:6379/13"))
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--live", action="store_true")
    args = parser.parse_args()
    os.environ["DISPATCHER_REDIS_PREFIX"] = PREFIX
    try:
        accuracy(args.redis, args.processes)
        cost(args.redis)
        if args.live:
            asyncio.run(live(args.redis))
    finally:
        import redis

        client = redis.Redis.from_url(args.redis)
        for key in client.scan_iter(f"{PREFIX}*"):
            client.delete(key)


if __name__ == "__main__":
    main()
