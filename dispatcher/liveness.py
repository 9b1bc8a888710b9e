"""Worker liveness: each worker process's identity and heartbeat, so that a dead one is noticed in seconds.

A process registers in the store's `workers` table before its first claim, then a daemon thread
refreshes `last_seen` every `heartbeat_seconds`. Every claim names its worker (`claimed_by`).
The reaper (recovery.py) takes a worker whose row is missing or older than `worker_timeout` as
dead and settles its claims. A clean shutdown removes the row once its sends are recorded.

The heartbeat lives in the store, not in Redis: a Redis restart must not make every live worker
look dead, and the store is what the claims themselves are in.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import delete, select, update

from .store.db import session_scope
from .store.models import SENDING, Message, Worker, utcnow

log = logging.getLogger("dispatcher.liveness")
# Not a worker: the holder of a claim left `sending` after an ambiguous answer, for the reaper to
# settle by asking the provider (recovery.py). It never beats, so it is always "dead".
ASK_PROVIDER = "(ask the provider)"
_ids: dict[int, str] = {}
_lock = threading.Lock()
_beats: dict[int, "Heartbeat"] = {}


def worker_id() -> str:
    """This process's identity in claims: host, pid and a random part (a pid is reused)."""
    pid = os.getpid()
    with _lock:
        if pid not in _ids:
            _ids[pid] = f"{socket.gethostname()[:40]}-{pid}-{uuid.uuid4().hex[:8]}"
        return _ids[pid]


class Heartbeat:
    """A daemon thread writing this process's `last_seen` into each store it claims from."""

    def __init__(self, every: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.every, self.clock = every, clock
        self.urls: set[str] = set()
        self.last_ok: dict[str, float] = {}  # url -> time.monotonic() of the last heartbeat written
        self.last_failed: dict[str, float] = {}  # url -> time.monotonic() of the last heartbeat that failed
        self._stop = threading.Event()
        self._adding = threading.Lock()  # a process's first tasks arrive at once, each on its own thread
        self._thread = threading.Thread(target=self._run, name="dispatcher-heartbeat", daemon=True)
        self._thread.start()

    def add(self, url: str) -> None:
        """Register in the store at `url` now (before any claim there), then keep beating.
        One thread registers; the others wait for it (two inserting the same row at once would fail)."""
        if url in self.urls:
            return
        with self._adding:
            if url not in self.urls:
                beat(url, self.clock())
                self.last_ok[url] = time.monotonic()
                self.urls.add(url)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for url in list(self.urls):
                try:
                    beat(url, self.clock())
                    self.last_ok[url] = time.monotonic()
                except Exception as exc:  # noqa: BLE001 - the store may be away; beat again next time
                    self.last_failed[url] = time.monotonic()
                    log.warning("heartbeat of %s not written (%s: %s)", worker_id(), type(exc).__name__, exc)

    def stop(self) -> None:
        """Stop beating and remove this worker from every store: it has nothing in flight."""
        self._stop.set()
        for url in list(self.urls):
            try:
                with session_scope(url) as db:
                    db.execute(delete(Worker).where(Worker.id == worker_id()))
            except Exception as exc:  # noqa: BLE001 - going away; the reaper treats it as dead
                log.warning("could not retire worker %s (%s)", worker_id(), type(exc).__name__)
        self.urls.clear()


def beat(url: str, now: datetime) -> None:
    me = worker_id()
    with session_scope(url) as db:
        if db.execute(update(Worker).where(Worker.id == me).values(last_seen=now)).rowcount == 0:
            db.add(Worker(id=me, host=socket.gethostname()[:200], pid=os.getpid(), started_at=now, last_seen=now))


def ensure_alive(url: str, every: float) -> None:
    """Make sure this process beats into the store at `url` (first beat written before return)."""
    pid = os.getpid()
    with _lock:
        hb = _beats.get(pid)
        if hb is None:
            hb = _beats[pid] = Heartbeat(every)
    hb.add(url)


def own_heartbeat_stale(url: str, max_age: float, settle: float) -> bool:
    """True when this process beats into `url` but has not managed to for `max_age` seconds, or
    failed to within the last `settle` seconds: the store was away from it too, so other
    workers' silence proves nothing until their heartbeats have had time to resume."""
    with _lock:
        hb = _beats.get(os.getpid())
    if hb is None or url not in hb.urls:
        return False
    now = time.monotonic()
    return now - hb.last_ok.get(url, 0.0) > max_age or now - hb.last_failed.get(url, -1e9) < settle


def retire() -> None:
    """Clean shutdown: stop this process's heartbeat and remove its worker rows."""
    with _lock:
        hb = _beats.pop(os.getpid(), None)
    if hb is not None:
        hb.stop()


def dead_workers(db, now: datetime, timeout: float) -> list[str]:  # type: ignore[no-untyped-def]
    """Workers holding `sending` claims whose heartbeat is missing or older than `timeout` s."""
    holders = [row[0] for row in db.execute(
        select(Message.claimed_by).where(Message.status == SENDING, Message.claimed_by.is_not(None)).distinct())]
    if not holders:
        return []
    alive_since = now - timedelta(seconds=timeout)
    alive = {row[0] for row in db.execute(
        select(Worker.id).where(Worker.id.in_(holders), Worker.last_seen >= alive_since))}
    return [w for w in holders if w not in alive]


def forget(db, worker: str, now: datetime, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Remove a dead worker's row once none of its claims is left (not if it beat meanwhile)."""
    db.execute(delete(Worker).where(Worker.id == worker, Worker.last_seen < now - timedelta(seconds=timeout)))
