"""Where the rate limiter keeps its state: a small storage interface and its implementations.

The strategy (strategy.py) turns a configured limit into a `SlotRule` and asks a storage for
two atomic primitives:

* `reserve(account, rule, n, horizon_us, bulk=, guard_us=)`: decide up to n send instants under
  the rule, record them and report the next free one, all in one step on one clock; a bulk
  call's instants may be taken by a later priority call until they are confirmed;
* `confirm(account, tickets)`: a bulk holder claims its instants for good, just before it sends
  (those already taken come back False: the holder reserves again);
* `extend_pause(account, until_ms)` / `read_pause(account)`: an extend-only pause.

`RedisRateStorage` is the one the dispatcher ships: each primitive is one Lua script
(reserve.lua, pause.lua) run on the Redis server, reading the server's clock, so any number of
workers on any machines share one decision. `MemoryRateStorage` does the same maths in Python
under a lock with an injectable clock; it exists for pure unit tests of the strategy and as a
readable reference that the Redis script is checked against.

All times crossing this interface are integers: microseconds for instants, milliseconds for
pause ends (the unit of the pause key, see dispatcher/keys.py).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import keys
from ..errors import DispatcherError


class RateLimiterUnavailable(DispatcherError):
    """The rate limiter's Redis could not be reached: wait a little and try again."""


@dataclass(frozen=True)
class SlotRule:
    """A limit in the storage's terms (µs): at most `cap` instants in any `window_us`, spaced
    `emission_us` apart once the burst allowance `tolerance_us` is spent. A rule of None means
    "no limit": only a pause holds requests back."""

    cap: int
    window_us: int
    emission_us: int
    tolerance_us: int


@dataclass(frozen=True)
class Grant:
    """What one reserve decided, on the storage's clock."""

    now_us: int  # the clock reading the decision was made at (µs since epoch)
    offsets_us: tuple[int, ...]  # one per granted slot: instant - now, non-decreasing
    next_free_us: int  # instant - now that one more slot would get
    pause_ms: int  # pause end in force (ms since epoch), 0 when none
    taken: int = 0  # a priority call: how many of its instants were taken from bulk holders
    tickets: tuple[str, ...] = ()  # a bulk call: one per granted instant, for confirm()


@dataclass(frozen=True)
class PauseState:
    pause_ms: int  # the pause end now in force, 0 when none
    extended: bool  # True when this call moved it later


class RateStorage(ABC):
    """The atomic primitives a rate-limit strategy needs, per account."""

    @abstractmethod
    def reserve(self, account: str, rule: SlotRule | None, n: int, horizon_us: int, *, bulk: bool = False,
                guard_us: int = 0) -> Grant:
        """Grant up to n instants no later than now + horizon_us; n = 0 only looks. A priority
        call (bulk False) may take bulk instants not yet confirmed that lie at or after now + guard_us."""

    @abstractmethod
    def confirm(self, account: str, tickets: list[str]) -> list[bool]:
        """Claim bulk instants for good; False for each one a priority call took."""

    @abstractmethod
    def extend_pause(self, account: str, until_ms: int, longest_ms: int) -> PauseState:
        """Hold every grant until `until_ms` (at most `longest_ms` from now), unless a later
        pause already holds."""

    @abstractmethod
    def read_pause(self, account: str) -> int:
        """The pause end in force (ms since epoch), 0 when none."""


# --------------------------------------------------------------------------- Redis
def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


_RESERVE_LUA = _script("reserve.lua")
_PAUSE_LUA = _script("pause.lua")
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError)


@contextmanager
def _unavailable_on_redis_errors(action: str) -> Iterator[None]:
    try:
        yield
    except _TRANSIENT as exc:
        raise RateLimiterUnavailable(f"rate limiter: Redis unreachable while {action}: {exc}") from exc


class RedisRateStorage(RateStorage):
    """The shared storage: one Lua call per primitive, keys prefixed and hash-tagged per account."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._reserve = client.register_script(_RESERVE_LUA)
        self._pause = client.register_script(_PAUSE_LUA)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 2.0) -> RedisRateStorage:
        """A client that gives up fast (one immediate retry) so callers can wait and come back."""
        client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1)
        )
        return cls(client)

    def reserve(self, account: str, rule: SlotRule | None, n: int, horizon_us: int, *, bulk: bool = False,
                guard_us: int = 0) -> Grant:
        args = [n, horizon_us, *_rule_args(rule), int(bulk), guard_us]
        with _unavailable_on_redis_errors(f"reserving slots for {account!r}"):
            reply = self._reserve(keys=_reserve_keys(account), args=args)
        now, granted, next_free, pause_ms, taken = (int(v) for v in reply[:5])
        offsets = tuple(int(v) for v in reply[5 : 5 + granted])
        tickets = tuple(v.decode() for v in reply[5 + granted :])
        return Grant(now, offsets, next_free, pause_ms, taken, tickets)

    def confirm(self, account: str, tickets: list[str]) -> list[bool]:
        if not tickets:
            return []
        with _unavailable_on_redis_errors(f"confirming slots of {account!r}"):
            pipe = self.client.pipeline(transaction=False)
            for ticket in tickets:
                pipe.zrem(keys.rate_bulk(account), ticket)
            return [bool(removed) for removed in pipe.execute()]

    def extend_pause(self, account: str, until_ms: int, longest_ms: int) -> PauseState:
        with _unavailable_on_redis_errors(f"pausing {account!r}"):
            pause_ms, extended = self._pause(keys=[keys.rate_pause(account)], args=[until_ms, longest_ms])
        return PauseState(int(pause_ms), bool(extended))

    def read_pause(self, account: str) -> int:
        with _unavailable_on_redis_errors(f"reading the pause of {account!r}"):
            (seconds, micros), value = self.client.pipeline(transaction=False).time().get(keys.rate_pause(account)).execute()
        # Redis keeps a key through the very millisecond it expires at; reserve.lua does not.
        return int(value) if value and int(value) * 1000 > seconds * 1_000_000 + micros else 0


def _reserve_keys(account: str) -> list[str]:
    return [keys.rate_bucket(account), keys.rate_log(account), keys.rate_pause(account), keys.rate_bulk(account)]


def _rule_args(rule: SlotRule | None) -> list[int]:
    if rule is None:
        return [0, 0, 0, 0]
    return [rule.emission_us, rule.tolerance_us, rule.window_us, rule.cap]


# --------------------------------------------------------------------------- in process
@dataclass
class _AccountState:
    tat: int = 0
    log: list[int] = field(default_factory=list)  # reserved instants, ascending
    pause_ms: int = 0
    seq: int = 0  # members named so far
    bulk: dict[str, int] = field(default_factory=dict)  # unconfirmed bulk ticket -> instant


class MemoryRateStorage(RateStorage):
    """The same decisions as reserve.lua / pause.lua, in one process, on an injectable clock.

    `clock()` returns epoch seconds. Not shared between processes: tests and reference only.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._accounts: dict[str, _AccountState] = {}

    def reserve(self, account: str, rule: SlotRule | None, n: int, horizon_us: int, *, bulk: bool = False,
                guard_us: int = 0, now_us: int | None = None) -> Grant:
        """`now_us` replaces the clock reading (used to replay what Redis decided)."""
        now = round(self.clock() * 1e6) if now_us is None else now_us
        with self._lock:
            state = self._accounts.setdefault(account, _AccountState())
            return plan_slots(state, rule, n, horizon_us, now, bulk=bulk, guard_us=guard_us)

    def confirm(self, account: str, tickets: list[str]) -> list[bool]:
        with self._lock:
            held = self._accounts.setdefault(account, _AccountState()).bulk
            return [held.pop(t, None) is not None for t in tickets]

    def extend_pause(self, account: str, until_ms: int, longest_ms: int) -> PauseState:
        now_ms = int(self.clock() * 1000)
        until_ms = min(until_ms, now_ms + longest_ms)
        with self._lock:
            state = self._accounts.setdefault(account, _AccountState())
            current = state.pause_ms if state.pause_ms > now_ms else 0
            if until_ms > now_ms and until_ms > current:
                state.pause_ms = until_ms
                return PauseState(until_ms, True)
            return PauseState(current, False)

    def read_pause(self, account: str) -> int:
        now_ms = int(self.clock() * 1000)
        with self._lock:
            state = self._accounts.get(account)
            return state.pause_ms if state is not None and state.pause_ms > now_ms else 0


def plan_slots(state: _AccountState, rule: SlotRule | None, n: int, horizon_us: int, now: int, *,
               bulk: bool = False, guard_us: int = 0) -> Grant:
    """reserve.lua, line for line, over an in-process state (mutated in place)."""
    paused = state.pause_ms * 1000 > now
    start = state.pause_ms * 1000 if paused else now
    shown_pause = state.pause_ms if paused else 0
    if rule is None:
        if paused:
            return Grant(now, (), start - now, shown_pause)
        return Grant(now, (0,) * n, 0, 0)
    state.log = [s for s in state.log if s > now - rule.window_us]
    state.bulk = {t: at for t, at in state.bulk.items() if at > now - rule.window_us}
    old, tat = state.log, state.tat
    last = old[-1] if old else 0
    new: list[int] = []

    def next_slot() -> int:
        at = max(start, tat - rule.tolerance_us, last)
        back = len(old) + len(new) - rule.cap
        if back >= 0:
            earlier = old[back] if back < len(old) else new[back - len(old)]
            at = max(at, earlier + rule.window_us)
        return at

    takeable: list[tuple[str, int]] = []
    if not paused and not bulk and n > 0:
        takeable = sorted(((t, at) for t, at in state.bulk.items() if now + guard_us <= at <= now + horizon_us),
                          key=lambda item: (item[1], item[0]))[:n]
    granted: list[int] = []
    taken = 0
    while not paused and len(granted) < n:
        at = next_slot()
        other = takeable[taken] if taken < len(takeable) else None
        if other is not None and (at > now + horizon_us or other[1] < at):
            taken += 1
            granted.append(other[1])
            del state.bulk[other[0]]
            continue
        if at > now + horizon_us:
            break
        new.append(at)
        granted.append(at)
        tat = max(tat, at) + rule.emission_us
        last = at
    next_free = next_slot()
    tickets: tuple[str, ...] = ()
    if new:
        tickets = tuple(f"{at}:{state.seq + i}" for i, at in enumerate(new, start=1))
        state.seq += len(new)
        if bulk:
            state.bulk.update(zip(tickets, new))
    state.log.extend(new)
    state.tat = tat
    return Grant(now, tuple(at - now for at in granted), next_free - now, shown_pause, taken,
                 tickets if bulk else ())
