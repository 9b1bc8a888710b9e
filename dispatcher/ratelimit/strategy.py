"""The rate-limit policy: what "N per period" means, and how a batch of sends gets its instants.

What must hold (design.md): with the default burst of 1, no window of the limit's unit (any
1 s for "N/s", any 60 s for "N/m", any 300 s for "N/5m", any hour for "N/h") carries more than
N requests, from the very first request on, across every worker. A larger `burst` is an
opt-in to send that many back to back; it never lifts the N-per-window cap.

Why not plain GCRA. GCRA with spacing T = period/N lets requests go at 0, T, 2T, ..., NT: the
closed window [0, period] then holds N + 1 of them. And any jitter between the instant a
worker sends and the instant the provider counts (event-loop lateness, network latency spread)
compresses spacing, so a limiter exact on paper overshoots at the provider. With a burst B > 1
GCRA also admits B - 1 requests beyond N in a window right after an idle spell.

What we do: two rules over one window W = period + margin, both checked in one Redis script.
* A sliding log of reserved instants (a sorted set) caps the count: a slot may be at t only if
  the instant N places before it is at or before t - W. So every half-open window of length W,
  hence every closed window of the unit, holds at most N reserved instants, whatever the burst.
* GCRA with spacing W/N (slightly slower than period/N) and burst allowance (B - 1)·W/N shapes
  the flow: B may go at once after an idle spell, then one every W/N. With B = 1 the GCRA
  spacing alone already meets the cap; the log is what keeps a larger burst honest.
* The margin (default 2% of the period, at most 1 s) is the jitter budget: if every request
  reaches the provider between d_min and d_max after its reserved instant, a provider window of
  length `period` sees requests reserved within period + (d_max - d_min), so N holds at the
  provider while that spread stays under the margin: 20 ms for "N/s", 1 s for longer units
  (raise `margin_ratio` / `max_margin` for a jittery path). It costs 2% of throughput for
  "N/s", 1.7% for "N/m", 0.3% for "N/5m" and 0.03% for "N/h".
* Half the margin is the sender's: `Reservation.slack`. A worker may use a slot up to `slack`
  after its instant; a slot missed by more (a stalled event loop, a full connection pool) is
  forfeit and the message reserves again. Without that rule a stalled worker fires its overdue
  slots together, right beside other workers' on-time ones, and the provider sees more than N
  in a window. The other half absorbs the network's latency spread.

Priority: campaign messages reserve as "bulk", everything else as "priority". A bulk instant
stays takeable until its holder confirms it, just before the send (CONFIRM_LEAD ahead); a
priority reservation takes the earliest takeable bulk instant at least `priority_guard` ahead
when that is earlier than its own next free instant. The instant is still counted once in the
log, so the limit is untouched; the bulk holder's confirm fails and it reserves again, at the
end. A single send on an account busy with a campaign therefore waits for the bulk instants
already confirmed (about CONFIRM_LEAD of them), not for the whole look-ahead of the campaign.

Cost: the log holds the instants of the last window W plus those reserved ahead (about 2,000
for 2000/5m), older ones are trimmed on every call, and a call reads only the few ranks it
needs (O(log size + n)): about 0.2 ms per reserve for 2000/5m as for 20/s.

A fractional count ("1.5/s") becomes whole requests over a scaled window (1 per 0.667 s).

Reservations are consumed: an instant handed out and not used only wastes capacity, it never
lets more through. Clock: every decision reads the Redis server's clock; the caller receives
delays relative to that reading, so skew between worker machines does not matter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..config import RateLimit
from ..providers.base import RateSignal
from .storage import Grant, RateStorage, RedisRateStorage, SlotRule

log = logging.getLogger("dispatcher.ratelimit")

DEFAULT_MARGIN_RATIO = 0.02  # of the limit's period, added to the window
DEFAULT_MAX_MARGIN = 1.0  # seconds: the margin never exceeds this
DEFAULT_MAX_PAUSE = 86400.0  # seconds: a provider's pause request is clamped to this
CONFIRM_LEAD = 0.035  # seconds before its instant a bulk holder confirms it (before recording its start)
PRIORITY_GUARD = 0.03  # a priority call takes only bulk instants at least this far ahead: time to use them


@dataclass(frozen=True)
class Reservation:
    """The answer to one reserve(): send `granted` requests at `delays` seconds from now.

    `retry_after` (seconds from now) says when the next slot frees up if fewer than asked were
    granted; `paused_until` (epoch seconds) is the provider-imposed pause in force, if any.
    `server_time` is the Redis clock reading (epoch seconds) the delays count from.

    Use slot i between delays[i] and delays[i] + `slack` seconds after the reply arrived; a slot
    missed by more than `slack` is forfeit (it stays counted as used): reserve again.
    """

    granted: int
    delays: list[float] = field(default_factory=list)
    retry_after: float | None = None
    paused_until: float | None = None
    server_time: float = 0.0
    slack: float = math.inf  # lateness a slot tolerates; unlimited when the account has no limit
    tickets: list[str] = field(default_factory=list)  # bulk: one per slot, to confirm() before use
    taken: int = 0  # priority: slots taken from bulk holders

    @property
    def instants(self) -> list[float]:
        """The reserved send instants as epoch seconds on the server's clock."""
        return [self.server_time + d for d in self.delays]


def rule_for(rate: RateLimit, margin_ratio: float = DEFAULT_MARGIN_RATIO, max_margin: float = DEFAULT_MAX_MARGIN) -> SlotRule:
    """The storage's form of a configured limit (see the module docstring)."""
    cap = max(1, math.floor(rate.count))
    base = _base_window(rate)
    window_us = math.ceil((base + _margin(rate, margin_ratio, max_margin)) * 1e6)
    emission_us = math.ceil(window_us / cap)
    tolerance_us = (min(rate.burst, cap) - 1) * emission_us
    return SlotRule(cap=cap, window_us=window_us, emission_us=emission_us, tolerance_us=tolerance_us)


def slack_for(rate: RateLimit | None, margin_ratio: float = DEFAULT_MARGIN_RATIO, max_margin: float = DEFAULT_MAX_MARGIN) -> float:
    """How late (seconds) a worker may use a reserved slot: half the margin (see the module docstring)."""
    return math.inf if rate is None else _margin(rate, margin_ratio, max_margin) / 2


def _base_window(rate: RateLimit) -> float:
    """The time the limit allows its whole number of requests in (the unit, for whole counts)."""
    return rate.period * max(1, math.floor(rate.count)) / rate.count


def _margin(rate: RateLimit, margin_ratio: float, max_margin: float) -> float:
    return min(_base_window(rate) * margin_ratio, max_margin)


class RateLimiter:
    """Global, adaptive limits per provider account over a `RateStorage`."""

    def __init__(
        self,
        storage: RateStorage,
        *,
        margin_ratio: float = DEFAULT_MARGIN_RATIO,
        max_margin: float = DEFAULT_MAX_MARGIN,
        max_pause: float = DEFAULT_MAX_PAUSE,
    ) -> None:
        if margin_ratio < 0 or max_margin < 0 or max_pause <= 0:
            raise ValueError("margin_ratio and max_margin must be >= 0, max_pause > 0")
        self.storage = storage
        self.margin_ratio = margin_ratio
        self.max_margin = max_margin
        self.max_pause = max_pause

    @classmethod
    def from_url(cls, redis_url: str, *, timeout: float = 2.0, **options: Any) -> RateLimiter:
        """A limiter over the shared Redis; `timeout` bounds how long an outage takes to report."""
        return cls(RedisRateStorage.from_url(redis_url, timeout=timeout), **options)

    # ---- capacity
    def reserve(self, account: str, rate: RateLimit | None, n: int, max_wait: float = 0.0, *,
                bulk: bool = False) -> Reservation:
        """Reserve up to n send instants no later than max_wait seconds from now (server clock).

        The granted instants are recorded at once (consumed whether used or not). While a pause
        holds nothing is granted, however long max_wait; retry_after then points at its end.
        rate None means the account has no configured limit: only a pause holds it back.
        `bulk` (campaign messages): each slot must be confirm()ed with its ticket just before
        use; a priority reservation may take it before that (module docstring, "Priority").
        Raises RateLimiterUnavailable when Redis cannot be reached.
        """
        if n < 0 or max_wait < 0:
            raise ValueError("n and max_wait must be >= 0")
        rule = None if rate is None else rule_for(rate, self.margin_ratio, self.max_margin)
        grant = self.storage.reserve(account, rule, n, int(max_wait * 1e6), bulk=bulk,
                                     guard_us=int(PRIORITY_GUARD * 1e6))
        return _reservation(grant, n, slack_for(rate, self.margin_ratio, self.max_margin))

    def confirm(self, account: str, tickets: list[str]) -> list[bool]:
        """Claim bulk slots for good; False where a priority reservation took the slot first
        (reserve again). Raises RateLimiterUnavailable when Redis cannot be reached."""
        return self.storage.confirm(account, tickets)

    # ---- pauses learned from providers
    def pause(self, account: str, until: float) -> float | None:
        """Grant nothing for `account` before `until` (epoch seconds); extend-only.

        A pause never reaches further than `max_pause` seconds ahead on the storage's clock.
        Returns the pause end in force afterwards (None when none: `until` already passed).
        """
        if not math.isfinite(until):
            raise ValueError(f"pause end must be a finite epoch time, got {until!r}")
        wanted_ms = math.ceil(until * 1000)
        state = self.storage.extend_pause(account, wanted_ms, math.ceil(self.max_pause * 1000))
        if state.extended:
            clamped = " (clamped to max_pause)" if state.pause_ms < wanted_ms else ""
            log.warning("rate limit: account %s paused until %s%s", account, _iso(state.pause_ms / 1000), clamped)
        return state.pause_ms / 1000 if state.pause_ms else None

    def paused_until(self, account: str) -> float | None:
        """The pause end in force for `account` (epoch seconds), or None."""
        pause_ms = self.storage.read_pause(account)
        return pause_ms / 1000 if pause_ms else None

    def learn(self, account: str, signal: RateSignal | None) -> float | None:
        """Apply what a provider's response said (429, Retry-After, Remaining 0 + Reset).

        Returns the pause end in force when the signal asked for one, else None.
        """
        if signal is None or signal.pause_until is None:
            return None
        return self.pause(account, signal.pause_until)

    # ---- status
    def describe(self, account: str, rate: RateLimit | None = None) -> dict[str, Any]:
        """The account's current pause and next free instant, for a status command. Records nothing."""
        rule = None if rate is None else rule_for(rate, self.margin_ratio, self.max_margin)
        grant = self.storage.reserve(account, rule, 0, 0)
        now = grant.now_us / 1e6
        next_free = now + grant.next_free_us / 1e6
        paused = grant.pause_ms / 1000 if grant.pause_ms else None
        return {
            "account": account,
            "limit": str(rate) if rate is not None else None,
            "server_time": _iso(now),
            "paused_until": _iso(paused) if paused else None,
            "next_free": _iso(next_free),
            "next_free_in": round(grant.next_free_us / 1e6, 6),
        }


def _reservation(grant: Grant, wanted: int, slack: float) -> Reservation:
    granted = len(grant.offsets_us)
    return Reservation(
        granted=granted,
        delays=[offset / 1e6 for offset in grant.offsets_us],
        retry_after=grant.next_free_us / 1e6 if granted < wanted else None,
        paused_until=grant.pause_ms / 1000 if grant.pause_ms else None,
        server_time=grant.now_us / 1e6,
        slack=slack,
        tickets=list(grant.tickets),
        taken=grant.taken,
    )


def _iso(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).isoformat(timespec="milliseconds")
