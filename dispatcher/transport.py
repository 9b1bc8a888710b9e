"""The HTTP edge: one event loop per process, and one shared async client over aiohttp.

It also counts requests in flight per provider account (`room()`, a Room given back in one
place) so that a slow provider fills only its own share of the process, and runs work in the
background (`submit`) so that a Celery task need not wait for its HTTP requests.

Celery runs tasks in ordinary (prefork or thread) workers; the sends of a task run here,
on a long-lived event loop in a daemon thread, so a process keeps hundreds of requests in
flight over one connection pool. httpx's API (Request, Auth, timeouts) stays; the network
goes through `httpx-aiohttp`, because httpx's own async pool collapses at high concurrency
(design.md measures 62 req/s against 1,095 req/s at 256 in flight, 200 ms latency).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections import Counter
from typing import Any, Callable, Coroutine, TypeVar

import httpx
from httpx_aiohttp import AiohttpTransport

T = TypeVar("T")


def make_client(in_flight: int = 256, timeout: float = 60.0) -> httpx.AsyncClient:
    """An AsyncClient over aiohttp with room for `in_flight` connections to each of many providers.

    The pool is deliberately wide: the per-account cap (LoopThread.room) is what bounds work, so
    that one slow provider holding its connections never starves another of a connection.
    `timeout` caps every request; a send uses its account's own `timeout` below that cap.
    """
    limits = httpx.Limits(max_connections=in_flight * 16, max_keepalive_connections=in_flight * 2)
    return httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        trust_env=False,
    )


class Room:
    """Requests in flight taken from a LoopThread, per account: given back in one place.

    `release(account, n)` gives back part early; `handover()` moves what is held to a new Room
    (the background send that now owns it); `close()` (or leaving the `with` block) gives back
    whatever is still held, once.
    """

    def __init__(self, loop: "LoopThread") -> None:
        self._loop = loop
        self.held: Counter[str] = Counter()

    def release(self, account: str, count: int) -> None:
        count = min(count, self.held[account])
        if count > 0:
            self.held[account] -= count
            self._loop._give_back(account, count)

    def keep_only(self, wanted: Counter[str]) -> None:
        """Give back all but `wanted[account]` for every account held."""
        for account in list(self.held):
            self.release(account, self.held[account] - wanted[account])

    def handover(self) -> "Room":
        other = Room(self._loop)
        other.held, self.held = self.held, Counter()
        return other

    def close(self) -> None:
        for account in list(self.held):
            self.release(account, self.held[account])

    def __enter__(self) -> "Room":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` executes on it from any thread."""

    def __init__(self, in_flight: int = 256) -> None:
        self.in_flight = in_flight
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dispatcher-loop", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when an account's requests finish
        self._busy: Counter[str] = Counter()  # requests in flight per provider account
        self._background: set[concurrent.futures.Future] = set()
        self.stopping = threading.Event()  # set at shutdown: sends not yet started are handed back

    def run(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """Run the coroutine `factory()` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout)

    def client(self) -> httpx.AsyncClient:
        """The shared client; call only from coroutines running on this loop."""
        if self._client is None:
            self._client = make_client(self.in_flight)
        return self._client

    def submit(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future:
        """Start `factory()` on the loop and return at once; close() waits for it."""
        future = asyncio.run_coroutine_threadsafe(factory(), self._loop)
        with self._lock:
            self._background.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._background.discard(future)

    def room(self, wanted: dict[str, int], timeout: float) -> "Room":
        """Take room for requests in flight, per account, waiting at most `timeout` s in all for
        each account to have room for its whole want (or its whole share, if it wants more);
        each account gets what is free then. Use it as a context manager: what it still holds
        is given back on exit, whatever happens."""
        deadline = time.monotonic() + timeout
        room = Room(self)
        try:
            for account, n in wanted.items():
                with self._lock:
                    need = min(n, self.in_flight)
                    self._room.wait_for(lambda: self.in_flight - self._busy[account] >= need,
                                        max(deadline - time.monotonic(), 0.0))
                    granted = max(0, min(n, self.in_flight - self._busy[account]))
                    self._busy[account] += granted
                room.held[account] += granted
        except BaseException:
            room.close()
            raise
        return room

    def _give_back(self, account: str, count: int) -> None:
        with self._lock:
            self._busy[account] -= count
            self._room.notify_all()

    def busy(self, account: str) -> int:
        with self._lock:
            return self._busy[account]

    def drain(self, timeout: float) -> bool:
        """Wait for submitted work to finish; False if some is still running after `timeout`."""
        with self._lock:
            pending = list(self._background)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    def close(self, drain_timeout: float = 30.0) -> None:
        """Stop starting sends, let those under way finish and be recorded, then stop the loop."""
        async def shutdown() -> None:
            if self._client is not None:
                await self._client.aclose()

        self.stopping.set()
        self.drain(drain_timeout)
        try:
            self.run(shutdown, timeout=5)
        except Exception:  # noqa: BLE001 - closing on the way out; nothing to save
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


_loops: dict[int, LoopThread] = {}
_guard = threading.Lock()


def process_loop(in_flight: int = 256) -> LoopThread:
    """This process's loop (a forked child never reuses its parent's)."""
    pid = os.getpid()
    with _guard:
        loop = _loops.get(pid)
        if loop is None:
            loop = LoopThread(in_flight)
            _loops[pid] = loop
    return loop


def close_process_loop() -> None:
    with _guard:
        loop = _loops.pop(os.getpid(), None)
    if loop is not None:
        loop.close()


def warm_up(in_flight: int = 256) -> None:
    """Create the loop and its client now (TLS context, aiohttp session): not in a timed send."""
    loop = process_loop(in_flight)

    async def touch() -> None:
        loop.client()

    loop.run(touch)


def run(factory: Callable[[], Coroutine[Any, Any, Any]], in_flight: int = 256) -> Any:
    return process_loop(in_flight).run(factory)
