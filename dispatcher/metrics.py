"""Prometheus metrics: what the send path, status polls and webhooks did, and what waits.

Counters and histograms are fed by one-line hooks (`sends_settled` from dispatch.py,
`limiter_waits` from the admit step, `status_polled` from status.py, `webhook_middleware` in
webhooks.py); gauges of what waits (queue depth, the age of the oldest due message, the beat's
last tick, provider pauses) are read from the store and Redis when Prometheus scrapes, so they
are true whichever process did the work.

Names begin `dispatcher_`; a metric that concerns one provider account has an `account`
label. Several worker processes share one endpoint through prometheus-client's multiprocess
mode: `dispatcher worker` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before it
starts its processes, each writes its counters there, and the supervisor serves their sum
(supervisor.py). A process started any other way counts in its own memory.

The hooks never raise: a metric lost is never a message lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from typing import Any, Awaitable, Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("dispatcher.metrics")

SENDS = Counter("dispatcher_sends", "Send attempts settled, by account and outcome (accepted, rejected, retried, "
                "throttled, unknown, failed, expired) and the provider's or dispatcher's code",
                ["account", "outcome", "code"])
SEND_LATENCY = Histogram("dispatcher_send_latency_seconds", "Time from writing a send request to its answer",
                         ["account"], buckets=(0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0))
THROTTLE_WAIT = Counter("dispatcher_throttled_seconds", "Time sends waited for their slot under the account's "
                        "global rate limit", ["account"])
DEFERRED = Counter("dispatcher_throttled_deferred", "Messages given back to the queue because the rate limit had "
                   "no slot for them within throttle_wait (no attempt used)", ["account"])
STATUS_POLLS = Counter("dispatcher_status_polls", "Delivery-status requests, by account and result (ok, error)",
                       ["account", "result"])
WEBHOOKS = Counter("dispatcher_webhook_reports", "Delivery reports received, by account and HTTP answer",
                   ["account", "status"])

# attempt outcome (store/models.Attempt) -> metric outcome
_OUTCOMES = {"accepted": "accepted", "rejected": "rejected", "retry": "retried", "throttled": "throttled",
             "unknown": "unknown"}


# --------------------------------------------------------------------------- hooks
def sends_settled(messages: Sequence[Any], settlements: Sequence[Any]) -> None:
    """Count one batch's settled attempts (dispatch.py `_log_outcomes`): Prometheus and the
    shared activity counts of `dispatcher stats`."""
    try:
        tally: Tally[tuple[str, str]] = Tally()
        sends: Tally[tuple[str, str, str]] = Tally()
        latency_of: dict[str, Any] = {}  # account -> its histogram (one label lookup a batch, not a message)
        for m, st in zip(messages, settlements):
            outcome = _outcome(st)
            if outcome is None:
                continue
            attempt = st.attempt or {}
            code = st.values.get("error_code") or "" if outcome != "accepted" else ""
            sends[(m.provider, outcome, code)] += 1
            latency = attempt.get("latency_ms") or 0.0
            if latency > 0:
                histogram = latency_of.get(m.provider)
                if histogram is None:
                    histogram = latency_of[m.provider] = SEND_LATENCY.labels(m.provider)
                histogram.observe(latency / 1000.0)
            tally[(m.provider, outcome)] += 1
        for labels, n in sends.items():
            SENDS.labels(*labels).inc(n)
        with _pending_lock:
            tally.update(_pending)
            _pending.clear()
        _add_activity(tally)
    except Exception:  # noqa: BLE001 - see the module docstring
        log.exception("metrics: could not count %d settled send(s)", len(settlements))


def _outcome(st: Any) -> str | None:
    status = st.values.get("status")
    if status in ("failed", "expired"):
        return status
    attempt = st.attempt or {}
    return _OUTCOMES.get(attempt.get("outcome"), attempt.get("outcome"))


def limiter_waits(account: str, delays: Iterable[float], deferred: int) -> None:
    """Time granted sends wait for their slot, and how many found none (dispatch.py `admit`).

    It runs between a rate-limit reservation and the sends it booked, so it touches memory
    only: the deferred count reaches Redis (`dispatcher stats`) with the next batch's outcomes.
    """
    try:
        waited = sum(d for d in delays if d > 0)
        if waited:
            THROTTLE_WAIT.labels(account).inc(waited)
        if deferred:
            DEFERRED.labels(account).inc(deferred)
            with _pending_lock:
                _pending[(account, "deferred")] += deferred
    except Exception:  # noqa: BLE001
        log.exception("metrics: could not count rate-limit waits of %s", account)


_pending: Tally[tuple[str, str]] = Tally()  # activity counts waiting for the next sends_settled
_pending_lock = threading.Lock()


def status_polled(account: str, result: object) -> None:
    """One delivery-status request's result (status.py): a list of events, or an exception."""
    STATUS_POLLS.labels(account, "error" if isinstance(result, BaseException) else "ok").inc()


def webhook_middleware() -> Callable[..., Awaitable[Any]]:
    """An aiohttp middleware counting every report the receiver answers, by account and status."""
    from aiohttp import web

    @web.middleware
    async def count(request: "web.Request", handler: Callable[..., Awaitable[Any]]) -> Any:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        status = getattr(response, "status", 500)
        # an account the receiver does not know is one label, however many names are tried
        account = request.match_info.get("account", "") if status != 404 else "(unknown)"
        WEBHOOKS.labels(account, str(status)).inc()
        if isinstance(response, web.HTTPException):
            raise response
        return response

    return count


def _add_activity(tally: Tally[tuple[str, str]]) -> None:
    if not tally:
        return
    from . import activity, runtime

    activity.add(tally, runtime.settings().redis_url)


# --------------------------------------------------------------------------- what waits
class StoreCollector:
    """Gauges read at scrape time: queue depth and oldest due age (store), the beat's last
    tick and provider pauses (Redis). A source that cannot be read is left out of the scrape
    (and `dispatcher_up{source=...}` says 0) rather than failing it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def describe(self) -> list:
        return []  # collected on demand only: registering must not read the store

    def collect(self) -> Iterable[GaugeMetricFamily]:
        up = GaugeMetricFamily("dispatcher_up", "Whether the source of the waiting-work gauges could be read",
                               labels=["source"])
        depth = GaugeMetricFamily("dispatcher_queue_depth", "Messages waiting in the store, by status",
                                  labels=["account", "status"])
        oldest = GaugeMetricFamily("dispatcher_oldest_due_age_seconds",
                                   "How long the oldest due but unsent message of the account has been due",
                                   labels=["account"])
        try:
            self._store(depth, oldest)
            up.add_metric(["store"], 1)
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: the store could not be read: %s", type(exc).__name__)
            up.add_metric(["store"], 0)
        yield depth
        yield oldest
        redis_gauges = list(self._redis())
        up.add_metric(["redis"], 1 if redis_gauges else 0)
        yield from redis_gauges
        yield up

    def _store(self, depth: GaugeMetricFamily, oldest: GaugeMetricFamily) -> None:
        from datetime import datetime, timezone

        from . import backlog, runtime

        now = datetime.fromtimestamp(self.clock(), timezone.utc)
        with runtime.session() as db:
            waiting = backlog.read(db, now)
        for account in sorted(set(waiting) | set(runtime.settings().providers)):
            b = waiting.get(account, backlog.Backlog())
            for status, n in b.depth.items():
                depth.add_metric([account, status], n)
            oldest.add_metric([account], b.oldest_due_age)

    def _redis(self) -> Iterable[GaugeMetricFamily]:
        from . import health, runtime

        try:
            s = runtime.settings()
            last = health.last_tick(s.redis_url)
            tick = GaugeMetricFamily("dispatcher_beat_last_tick_timestamp_seconds",
                                     "When the beat's tick last ran (0: never)")
            tick.add_metric([], last or 0.0)
            paused = GaugeMetricFamily("dispatcher_paused_seconds",
                                       "Seconds until a pause the provider asked for ends (0: not paused)",
                                       labels=["account"])
            limiter = runtime.limiter()
            now = self.clock()
            for account in sorted(s.providers):
                until = limiter.paused_until(account)
                paused.add_metric([account], max(0.0, until - now) if until else 0.0)
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: Redis could not be read: %s", type(exc).__name__)
            return []
        return [tick, paused]


# --------------------------------------------------------------------------- exposition
def registry(multiprocess_dir: str | None = None) -> CollectorRegistry:
    """The registry to serve: every process's counters (multiprocess mode) or this one's, plus
    the gauges read at scrape time."""
    from prometheus_client import REGISTRY
    from prometheus_client import multiprocess

    global _default_ready
    directory = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=directory)
    elif not _default_ready:
        reg, _default_ready = REGISTRY, True
    else:
        return REGISTRY  # the scrape-time gauges are registered on it already
    reg.register(StoreCollector())
    return reg


_default_ready = False


def serve(port: int, host: str = "127.0.0.1", reg: CollectorRegistry | None = None) -> Any:
    """Serve Prometheus text at http://host:port/metrics from a daemon thread; returns the server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=reg or registry())
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


def render(reg: CollectorRegistry | None = None) -> str:
    """The text Prometheus would scrape (tests, `dispatcher stats --json` never needs it)."""
    from prometheus_client import generate_latest

    return generate_latest(reg or registry()).decode()
