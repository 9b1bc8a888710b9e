"""Exactly one beat: a Redis lock the beat process holds while it publishes ticks.

Celery beat has no lock of its own: two beats publish every tick twice. (That is safe, every
release being a compare-and-set, but wasteful, and it makes a rolling deployment run two.) So
a beat first takes `keys.beat_lock()` with SET NX PX (a TTL of LOCK_TTL s) and renews it every
RENEW_EVERY s from a daemon thread. A second beat waits, checking every few seconds, and takes
over within LOCK_TTL of the first one stopping, however it stopped. A beat that cannot renew
(another took the lock after Redis lost it, or Redis stayed unreachable until the TTL ran out)
stops itself with SIGTERM rather than tick beside another; its supervisor restarts it, and it
waits its turn.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Callable

import redis

from . import keys
from .redis_client import shared

log = logging.getLogger("dispatcher.beatlock")
LOCK_TTL = 30.0
RENEW_EVERY = 10.0
WAIT_EVERY = 3.0

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class BeatLock:
    """The lock itself: acquire, renew and release only what this holder's token holds."""

    def __init__(self, redis_url: str, ttl: float = LOCK_TTL, key: str | None = None, token: str | None = None) -> None:
        self.client = shared(redis_url)
        self.ttl, self.key = ttl, key or keys.beat_lock()
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=int(self.ttl * 1000)))

    def renew(self, ttl: float | None = None) -> bool:
        """Extend the lock to `ttl` (default: the lock's TTL) from now, if this holder still has it."""
        ms = max(1, int((self.ttl if ttl is None else ttl) * 1000))
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, ms))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def holder(self) -> str | None:
        raw = self.client.get(self.key)
        return None if raw is None else raw.decode()


class Holder:
    """Waits for the lock, then keeps it renewed; `on_lost` runs if it is lost."""

    def __init__(self, lock: BeatLock, on_lost: Callable[[], None] | None = None,
                 renew_every: float = RENEW_EVERY, wait_every: float = WAIT_EVERY) -> None:
        self.lock, self.renew_every, self.wait_every = lock, renew_every, wait_every
        self.on_lost = on_lost or _stop_this_process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def wait_and_hold(self) -> None:
        """Block until this process holds the lock, then renew it in the background."""
        said = False
        while not self._stop.is_set():
            try:
                if self.lock.acquire():
                    break
                if not said:
                    log.warning("another beat holds the lock (%s); this one waits and takes over if it stops",
                                self.lock.holder())
                    said = True
            except redis.exceptions.RedisError as exc:
                log.warning("beat lock: Redis unreachable (%s); waiting", type(exc).__name__)
            self._stop.wait(self.wait_every)
        log.info("beat lock taken (%s); this beat publishes the ticks", self.lock.token)
        self._thread = threading.Thread(target=self._renew_loop, name="dispatcher-beat-lock", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.renew_every):
            try:
                if self.lock.renew():
                    last_ok = time.monotonic()
                    continue
                log.error("beat lock lost: another beat holds it now (%s); stopping this one", self.lock.holder())
            except redis.exceptions.RedisError as exc:
                if time.monotonic() - last_ok < self.lock.ttl - self.renew_every:
                    log.warning("beat lock: could not renew (%s); trying again", type(exc).__name__)
                    continue
                log.error("beat lock: not renewed for %.0f s (Redis %s); stopping this beat so that two never "
                          "tick at once", time.monotonic() - last_ok, type(exc).__name__)
            self.on_lost()
            return

    def close(self) -> None:
        """Stop renewing and give the lock up, so a waiting beat takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.lock.release()
        except redis.exceptions.RedisError:
            pass  # it expires by itself


def _stop_this_process() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


_holder: Holder | None = None


def _on_beat_init(**_: object) -> None:
    """Celery's beat_init: hold the lock before the first tick is published."""
    import atexit

    from . import runtime

    global _holder
    _holder = Holder(BeatLock(runtime.settings().redis_url))
    _holder.wait_and_hold()
    atexit.register(_holder.close)


def celery_hooks() -> None:
    from celery import signals

    signals.beat_init.connect(_on_beat_init, weak=False)
