"""The global rate limiter: what a provider would count, pauses, isolation and outages.

Accuracy runs against the real Redis: the instants are computed (server time + delay), never
slept through. The in-process stub storage carries only the pure maths (with a fake clock) and
is checked to decide exactly what the Redis script decides.
"""

from __future__ import annotations

import bisect
import logging
import multiprocessing
import os
import random
import socket
import time
import uuid

import httpx
import pytest

from dispatcher import keys
from dispatcher.config import parse_rate_limit
from dispatcher.errors import DispatcherError
from dispatcher.providers.base import RateSignal, read_standard_rate_headers
from dispatcher.ratelimit import (
    MemoryRateStorage,
    RateLimiter,
    RateLimiterUnavailable,
    RedisRateStorage,
    Reservation,
    rule_for,
)


# --------------------------------------------------------------------------- helpers
@pytest.fixture()
def limiter(redis_url, redis_prefix, redis_client, monkeypatch) -> RateLimiter:
    monkeypatch.setenv("DISPATCHER_REDIS_PREFIX", redis_prefix)
    return RateLimiter.from_url(redis_url)


@pytest.fixture()
def account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


def most_in_window(instants: list[float], length: float) -> int:
    """The largest number of instants in any closed window [t, t + length]."""
    ordered = sorted(instants)
    return max((bisect.bisect_right(ordered, t + length) - i for i, t in enumerate(ordered)), default=0)


def reserve_all(limiter: RateLimiter, account: str, rate_text: str, total: int, batch: int, burst: int | None = None) -> list[float]:
    """Reserve `total` instants in batches with a horizon long enough that nothing is refused."""
    rate = parse_rate_limit(rate_text, burst)
    instants: list[float] = []
    while len(instants) < total:
        r = limiter.reserve(account, rate, min(batch, total - len(instants)), max_wait=2 * total * rate.interval + 60)
        assert r.granted > 0
        instants += r.instants
    return instants


def _reserve_in_process(url, prefix, account, rate_text, total, batch, barrier, results) -> None:
    os.environ["DISPATCHER_REDIS_PREFIX"] = prefix
    limiter = RateLimiter.from_url(url)
    barrier.wait(timeout=20)
    results.put(reserve_all(limiter, account, rate_text, total, batch))


# --------------------------------------------------------------------------- accuracy (real Redis)
def test_four_processes_at_20_per_second_never_put_21_in_any_second(limiter, redis_url, redis_prefix, account):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    args = (redis_url, redis_prefix, account, "20/s", 50, 7, barrier, results)
    procs = [ctx.Process(target=_reserve_in_process, args=args) for _ in range(4)]
    for p in procs:
        p.start()
    instants = [t for _ in procs for t in results.get(timeout=30)]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0

    assert len(instants) == 200
    assert most_in_window(instants, 1.0) == 20
    span = max(instants) - min(instants)
    assert 199 / 20 <= span <= 1.03 * 200 / 20


@pytest.mark.parametrize(
    "rate_text, unit, total, batch",
    [("5/m", 60.0, 20, 3), ("10/5m", 300.0, 25, 4), ("1000/h", 3600.0, 1500, 100), ("8/s", 1.0, 50, 50)],
)
def test_no_window_of_the_unit_carries_more_than_n_from_the_first_request_on(limiter, account, rate_text, unit, total, batch):
    rate = parse_rate_limit(rate_text)
    instants = reserve_all(limiter, account, rate_text, total, batch)

    assert most_in_window(instants, unit) == rate.count
    assert most_in_window(instants[: int(rate.count) + 1], unit) == rate.count  # the very first window too
    span = max(instants) - min(instants)
    assert (total - 1) * rate.interval <= span <= 1.03 * (total - 1) * rate.interval


def test_a_burst_goes_back_to_back_then_spaced_and_still_caps_every_window(limiter, account):
    rate = parse_rate_limit("10/s", burst=4)
    r = limiter.reserve(account, rate, 100, max_wait=60)

    assert r.delays[:4] == [0.0] * 4
    assert 0.1 <= r.delays[4] <= 0.11  # then one every period/N (plus the margin)
    assert r.delays == sorted(r.delays)
    assert most_in_window(r.instants, 1.0) == 10


def test_a_burst_as_large_as_the_limit_sends_n_at_once_then_waits_a_full_window(limiter, account):
    r = limiter.reserve(account, parse_rate_limit("10/s", burst=10), 11, max_wait=5)

    assert r.delays[:10] == [0.0] * 10
    assert r.delays[10] > 1.0


# --------------------------------------------------------------------------- priority over bulk
def test_a_priority_slot_goes_ahead_of_a_campaigns_reserved_slots_and_the_limit_holds(limiter, account):
    rate = parse_rate_limit("10/s")
    bulk = limiter.reserve(account, rate, 20, max_wait=5, bulk=True)  # 2 s of campaign slots ahead
    single = limiter.reserve(account, rate, 1, max_wait=5)

    assert single.taken == 1 and single.delays[0] < 0.15  # the next slot, not after the 20
    lost = limiter.confirm(account, bulk.tickets)
    assert lost.count(False) == 1  # exactly the slot it took
    victim = lost.index(False)
    assert bulk.instants[victim] == pytest.approx(single.instants[0])
    again = limiter.reserve(account, rate, 1, max_wait=5, bulk=True)  # the holder reserves again, at the end
    assert again.instants[0] > max(bulk.instants)
    used = [t for t, ok in zip(bulk.instants, lost) if ok] + single.instants + again.instants
    assert len(used) == 21 and most_in_window(used, 1.0) == 10


def test_confirmed_and_imminent_bulk_slots_are_never_taken(limiter, account):
    rate = parse_rate_limit("10/s")
    bulk = limiter.reserve(account, rate, 5, max_wait=5, bulk=True)  # the first is due now
    assert limiter.confirm(account, bulk.tickets[1:2]) == [True]  # its holder is about to send it

    single = limiter.reserve(account, rate, 1, max_wait=5)

    assert single.taken == 1 and single.instants[0] == pytest.approx(bulk.instants[2])
    assert limiter.confirm(account, bulk.tickets) == [True, False, False, True, True]  # [1] was confirmed already


def test_priority_reservations_never_take_from_each_other(limiter, account):
    rate = parse_rate_limit("10/s")
    first = limiter.reserve(account, rate, 5, max_wait=5)
    second = limiter.reserve(account, rate, 1, max_wait=5)

    assert second.taken == 0 and second.instants[0] > max(first.instants)
    assert first.tickets == [] and second.tickets == []


def test_every_reserved_instant_has_at_most_one_sender_and_the_cap_holds(redis_url, redis_prefix, redis_client,
                                                                        monkeypatch):
    monkeypatch.setenv("DISPATCHER_REDIS_PREFIX", redis_prefix)
    store = RedisRateStorage.from_url(redis_url)
    rule = rule_for(parse_rate_limit("50/s", 5))
    account = f"prop-{uuid.uuid4().hex[:6]}"
    rng = random.Random(5)
    bulk_held: dict[str, int] = {}  # ticket -> absolute instant (µs)
    used: list[int] = []  # instants someone sends at (absolute µs)
    for _ in range(600):
        if bulk_held and rng.random() < 0.3:
            tickets = rng.sample(list(bulk_held), min(len(bulk_held), rng.randint(1, 4)))
            for t, ok in zip(tickets, store.confirm(account, tickets)):
                at = bulk_held.pop(t)
                if ok:
                    used.append(at)
            continue
        bulk, n = rng.random() < 0.5, rng.randint(1, 6)
        horizon = rng.choice([50_000, 300_000, 2_000_000])
        g = store.reserve(account, rule, n, horizon, bulk=bulk, guard_us=30_000)
        instants = [g.now_us + o for o in g.offsets_us]
        assert all(o <= horizon for o in g.offsets_us)
        assert list(g.offsets_us) == sorted(g.offsets_us)
        if bulk:
            bulk_held.update(zip(g.tickets, instants))
        else:
            assert all(o >= 30_000 for o in g.offsets_us[: g.taken]) or g.taken == 0
            used += instants
    used += list(bulk_held.values())  # tickets never confirmed: assume their holders send (worst case)
    # every instant has one sender (a taken one moved, its holder's confirm failed): no window carries more than the cap
    assert most_in_window([u / 1e6 for u in used], 1.0) <= 50


# --------------------------------------------------------------------------- the batch contract
def _worst_lateness(instants: list[float], late: float, unit: float) -> int:
    """The most sends in any window when every slot before some pivot goes `late` seconds late
    and the rest on time: the pattern that packs the most into one window."""
    ordered = sorted(instants)
    return max(most_in_window([t + late if t < pivot else t for t in ordered], unit) for pivot in ordered)


def test_slots_used_within_their_slack_still_hold_the_limit_and_later_ones_would_not(limiter, account):
    r = limiter.reserve(account, parse_rate_limit("20/s"), 120, max_wait=60)

    assert r.slack == pytest.approx(0.01)
    assert _worst_lateness(r.instants, r.slack, 1.0) == 20
    assert _worst_lateness(r.instants, 3 * r.slack, 1.0) > 20  # why an overdue slot is forfeit


def test_an_account_without_a_limit_tolerates_any_lateness(limiter, account):
    assert limiter.reserve(account, None, 1).slack == float("inf")


def test_max_wait_is_honoured_and_the_rest_gets_a_retry_after(limiter, account):
    r = limiter.reserve(account, parse_rate_limit("10/s"), 50, max_wait=0.5)

    assert r.granted == len(r.delays) == 5
    assert r.delays == sorted(r.delays) and r.delays[-1] <= 0.5
    assert 0.5 < r.retry_after <= 0.5 + 0.11
    assert r.paused_until is None


def test_everything_granted_means_no_retry_after(limiter, account):
    r = limiter.reserve(account, parse_rate_limit("10/s"), 3, max_wait=1)

    assert r.granted == 3 and r.retry_after is None


def test_reserved_instants_are_consumed_by_the_next_caller(limiter, account):
    rate = parse_rate_limit("10/s")
    first = limiter.reserve(account, rate, 5, max_wait=1)
    second = limiter.reserve(account, rate, 5, max_wait=1)

    assert min(second.instants) >= max(first.instants) + 0.1
    assert most_in_window(first.instants + second.instants, 1.0) <= 10


def test_max_wait_zero_grants_only_what_is_free_now(limiter, account):
    rate = parse_rate_limit("1/s")
    r = limiter.reserve(account, rate, 5, max_wait=0)
    again = limiter.reserve(account, rate, 5, max_wait=0)

    assert r.delays == [0.0] and r.retry_after == pytest.approx(1.02)
    assert again.granted == 0 and 0 < again.retry_after <= 1.02


def test_one_accounts_exhaustion_never_delays_another(limiter, account):
    rate = parse_rate_limit("10/s")
    limiter.reserve(account, rate, 1000, max_wait=30)
    limiter.pause(account, time.time() + 60)

    other = limiter.reserve(account + "-other", rate, 3, max_wait=0.5)
    assert other.delays[0] == 0.0 and other.granted == 3 and other.paused_until is None


def test_an_account_without_a_limit_goes_at_once_unless_paused(limiter, account):
    r = limiter.reserve(account, None, 500, max_wait=0)
    assert r.granted == 500 and set(r.delays) == {0.0}

    until = limiter.pause(account, time.time() + 30)
    r = limiter.reserve(account, None, 5, max_wait=60)
    assert r.granted == 0 and r.paused_until == until and r.retry_after > 25


def test_bad_arguments_are_refused(limiter, account):
    with pytest.raises(ValueError):
        limiter.reserve(account, parse_rate_limit("1/s"), -1)
    with pytest.raises(ValueError):
        limiter.reserve(account, parse_rate_limit("1/s"), 1, max_wait=-1)


# --------------------------------------------------------------------------- pauses
def test_a_pause_grants_nothing_until_its_time_then_spacing_resumes(limiter, account):
    rate = parse_rate_limit("20/s")
    until = limiter.pause(account, time.time() + 0.3)

    blocked = limiter.reserve(account, rate, 10, max_wait=30)
    assert blocked.granted == 0 and blocked.paused_until == until
    assert blocked.server_time + blocked.retry_after == pytest.approx(until, abs=1e-6)  # free again at its end

    deadline = time.monotonic() + 2
    while (r := limiter.reserve(account, rate, 2, max_wait=1)).granted == 0:
        assert time.monotonic() < deadline, "the pause never lifted"
        time.sleep(0.02)
    assert r.server_time >= until and r.paused_until is None
    assert r.delays == [0.0, pytest.approx(0.051)]
    assert limiter.paused_until(account) is None


def test_a_pause_only_ever_extends(limiter, account):
    now = time.time()
    assert limiter.pause(account, now + 30) == pytest.approx(now + 30, abs=0.002)
    assert limiter.pause(account, now + 10) == pytest.approx(now + 30, abs=0.002)
    assert limiter.paused_until(account) == pytest.approx(now + 30, abs=0.002)
    assert limiter.pause(account, now + 45) == pytest.approx(now + 45, abs=0.002)
    assert limiter.pause(account, now - 5) == pytest.approx(now + 45, abs=0.002)


def test_a_pause_in_the_past_does_nothing(limiter, account):
    assert limiter.pause(account, time.time() - 1) is None
    assert limiter.paused_until(account) is None
    assert limiter.reserve(account, parse_rate_limit("1/s"), 1).granted == 1


def test_a_429_with_retry_after_pauses_every_worker(limiter, redis_url, account):
    response = httpx.Response(429, headers={"Retry-After": "30"})
    until = limiter.learn(account, read_standard_rate_headers(response))

    assert until == pytest.approx(time.time() + 30, abs=1)
    another_worker = RateLimiter.from_url(redis_url)
    r = another_worker.reserve(account, parse_rate_limit("20/s"), 5, max_wait=10)
    assert r.granted == 0 and r.paused_until == until and r.retry_after == pytest.approx(30, abs=1)


def test_remaining_zero_pauses_until_reset_and_remaining_left_does_not(limiter, account):
    reset = time.time() + 20
    assert limiter.learn(account, RateSignal(limit=100, remaining=7, reset_at=reset)) is None
    assert limiter.learn(account, None) is None
    assert limiter.paused_until(account) is None

    assert limiter.learn(account, RateSignal(limit=100, remaining=0, reset_at=reset)) == pytest.approx(reset, abs=0.002)
    assert limiter.paused_until(account) == pytest.approx(reset, abs=0.002)


def test_an_absurd_pause_is_clamped(redis_url, redis_prefix, redis_client, monkeypatch, account):
    monkeypatch.setenv("DISPATCHER_REDIS_PREFIX", redis_prefix)
    limiter = RateLimiter.from_url(redis_url, max_pause=3600)

    assert limiter.pause(account, time.time() + 10 * 365 * 86400) == pytest.approx(time.time() + 3600, abs=1)


def test_a_pause_is_logged_with_account_and_utc_time(limiter, account, caplog):
    with caplog.at_level(logging.INFO, logger="dispatcher.ratelimit"):
        until = limiter.pause(account, time.time() + 120)
        limiter.pause(account, time.time() + 60)  # changes nothing, says nothing
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert account in record.getMessage()
    assert time.strftime("%Y-%m-%dT%H:%M", time.gmtime(until)) in record.getMessage()
    assert "+00:00" in record.getMessage()


def test_describe_shows_pause_and_next_free_instant(limiter, account):
    rate = parse_rate_limit("10/s")
    limiter.reserve(account, rate, 10, max_wait=5)
    state = limiter.describe(account, rate)
    assert state["account"] == account and state["paused_until"] is None
    assert 0.5 < state["next_free_in"] <= 1.02  # the first of the ten leaves the window

    limiter.pause(account, time.time() + 30)
    state = limiter.describe(account, rate)
    assert state["paused_until"] is not None and 29 < state["next_free_in"] <= 30.1
    assert limiter.describe(account, rate)["next_free_in"] <= state["next_free_in"]  # describing reserves nothing


# --------------------------------------------------------------------------- keys and outages
def test_keys_live_under_the_configured_prefix_and_are_tagged_per_account(limiter, redis_client, redis_prefix, account):
    limiter.reserve(account, parse_rate_limit("5/s"), 3, max_wait=1)
    limiter.pause(account, time.time() + 5)

    found = sorted(k.decode() for k in redis_client.scan_iter(f"*{account}*", count=1000))
    assert found == sorted([keys.rate_bucket(account), keys.rate_log(account), keys.rate_pause(account)])
    assert all(k.startswith(f"{redis_prefix}:") and f"{{{account}}}" in k for k in found)
    assert all(redis_client.pttl(k) > 0 for k in found)  # idle accounts leave nothing behind


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_unreachable_raises_rate_limiter_unavailable_quickly(account):
    limiter = RateLimiter.from_url(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.5)
    started = time.monotonic()
    for call in (
        lambda: limiter.reserve(account, parse_rate_limit("1/s"), 1),
        lambda: limiter.pause(account, time.time() + 5),
        lambda: limiter.paused_until(account),
    ):
        with pytest.raises(RateLimiterUnavailable) as caught:
            call()
        assert isinstance(caught.value, DispatcherError)
        assert "unreachable" in str(caught.value)
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------- the maths, stub vs Redis
def test_the_in_process_reference_decides_exactly_what_the_redis_script_decides(redis_url, redis_prefix, redis_client, monkeypatch):
    monkeypatch.setenv("DISPATCHER_REDIS_PREFIX", redis_prefix)
    shared, reference = RedisRateStorage.from_url(redis_url), MemoryRateStorage()
    rules = {
        f"cmp-{uuid.uuid4().hex[:6]}-{text}": rule_for(parse_rate_limit(text, burst))
        for text, burst in [("20/s", 1), ("5/s", 3), ("3/s", 3), ("2.5/s", 1), ("50/s", 80)]
    }
    rng = random.Random(7)
    held: list[tuple[str, str]] = []  # bulk tickets not confirmed yet
    seen = {"tickets": 0, "taken": 0, "confirmed": 0}
    for _ in range(300):
        account = rng.choice(list(rules))
        if held and rng.random() < 0.2:
            some = [held.pop(rng.randrange(len(held))) for _ in range(min(len(held), rng.randint(1, 3)))]
            for acct in {a for a, _ in some}:
                tickets = [t for a, t in some if a == acct]
                answer = shared.confirm(acct, tickets)
                assert reference.confirm(acct, tickets) == answer
                seen["confirmed"] += sum(answer)
            continue
        n, horizon_us = rng.randint(0, 12), rng.choice([0, 100_000, 400_000, 2_000_000])
        bulk, guard_us = rng.random() < 0.5, rng.choice([0, 30_000])
        got = shared.reserve(account, rules[account], n, horizon_us, bulk=bulk, guard_us=guard_us)
        assert reference.reserve(account, rules[account], n, horizon_us, bulk=bulk, guard_us=guard_us,
                                 now_us=got.now_us) == got
        held += [(account, t) for t in got.tickets]
        seen["tickets"] += len(got.tickets)
        seen["taken"] += got.taken
    assert min(seen.values()) > 0, seen  # every branch was exercised


def test_rule_for_turns_a_limit_into_window_spacing_and_burst():
    per_second = rule_for(parse_rate_limit("20/s"))
    assert (per_second.cap, per_second.window_us, per_second.emission_us, per_second.tolerance_us) == (20, 1_020_000, 51_000, 0)
    per_hour = rule_for(parse_rate_limit("1000/h", burst=10))
    assert (per_hour.cap, per_hour.window_us) == (1000, 3_601_000_000)  # the margin is capped at 1 s
    assert per_hour.tolerance_us == 9 * per_hour.emission_us
    fractional = rule_for(parse_rate_limit("1.5/s"))
    assert fractional.cap == 1 and fractional.window_us == pytest.approx(680_000, abs=1)
    exact = rule_for(parse_rate_limit("4/s"), margin_ratio=0)
    assert (exact.window_us, exact.emission_us) == (1_000_000, 250_000)


class FakeClock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_a_pause_lifts_exactly_at_its_time_on_the_storage_clock():
    clock = FakeClock()
    limiter = RateLimiter(MemoryRateStorage(clock))
    rate = parse_rate_limit("4/s")
    limiter.pause("a", clock.now + 10)

    clock.now += 9.999
    assert limiter.reserve("a", rate, 1, max_wait=5).granted == 0
    clock.now += 0.001
    r = limiter.reserve("a", rate, 3, max_wait=5)
    assert r.granted == 3 and r.paused_until is None


def test_an_idle_spell_refills_the_burst_but_never_the_window_cap():
    clock = FakeClock()
    limiter = RateLimiter(MemoryRateStorage(clock), margin_ratio=0)
    rate = parse_rate_limit("4/s", burst=4)
    first = limiter.reserve("a", rate, 4, max_wait=0)
    assert first.delays == [0.0] * 4

    clock.now += 0.5  # the GCRA burst would allow more, the window does not
    r = limiter.reserve("a", rate, 4, max_wait=0)
    assert r.granted == 0 and r.retry_after == pytest.approx(0.5)

    clock.now += 0.5
    assert limiter.reserve("a", rate, 4, max_wait=0).delays == [0.0] * 4


def test_a_reservation_lists_its_instants_on_the_server_clock():
    r = Reservation(granted=2, delays=[0.0, 0.5], server_time=100.0)
    assert r.instants == [100.0, 100.5]


def test_the_configured_rate_margin_widens_every_workers_spacing(dispatcher_env, sandbox, monkeypatch, account):
    from dispatcher import runtime

    from .conftest import write_config

    monkeypatch.setenv("DISPATCHER_CONFIG", write_config(dispatcher_env / "wide.toml", sandbox, rate_margin=0.1))
    runtime.configure(None)
    r = runtime.limiter().reserve(account, parse_rate_limit("10/s"), 11, max_wait=5)

    assert r.delays[1] - r.delays[0] == pytest.approx(0.11, abs=1e-4)  # 1.1 s for 10, not 1.02 s
    assert r.delays[10] - r.delays[0] >= 1.1  # the 11th waits a whole widened window
