"""The HTTP edge: one event loop per process, a Wire for sends, and a shared httpx client over aiohttp.

It also counts messages claimed and not yet sent per provider account (`room()`, a Room given
back in one place) and caps the requests in flight per account (`request_slot()`), so that a
slow provider fills only its own share of the process, and runs work in the background
(`submit`) so that a Celery task need not wait for its HTTP requests. A process may claim up
to `claim_ahead` messages more than it has request slots: the next batch is claimed, admitted
and ready while the current one's requests are still out, so a request slot never idles for
the length of a claim (docs/throughput.md).

Celery runs tasks in ordinary (prefork or thread) workers; the sends of a task run here,
on a long-lived event loop in a daemon thread, so a process keeps hundreds of requests in
flight over one connection pool. httpx's API (Request, Auth, timeouts) stays; the network
goes through `httpx-aiohttp`, because httpx's own async pool collapses at high concurrency
(design.md measures 62 req/s against 1,095 req/s at 256 in flight, 200 ms latency).

Sends go through a `Wire` rather than the httpx client: the adapters still build an
`httpx.Request`, sign it with their `httpx.Auth` and parse an `httpx.Response`, but the request's
exact bytes travel over an aiohttp session directly, without httpx's client layers (auth,
redirect and hook loops, stream wrappers, exception mapping), which cost a worker as much CPU
per message as the aiohttp request under them (docs/throughput.md). Status polls, cancels and
lookups keep the httpx client (`client()`): they are few.
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

from . import http1

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


class Wire:
    """Sends an `httpx.Request` as it is (the exact bytes its Auth signed) over kept-alive
    HTTP/1.1 connections (http1.py).

    `send(request, auth=...)` has the shape of `httpx.AsyncClient.send` for what the adapters use:
    it runs the Auth's flow (a token exchange included), follows no redirect, and returns an
    `httpx.Response` already read, with `.request` and `.history`. The timeouts are the request's
    `timeout` extension: connect, read (between bytes of the answer), and connect + read for the
    whole request, so that a provider dripping its answer a byte at a time cannot hold a batch's
    record for as long as it likes. A failure is one of httpx's errors carrying the request
    (http1.py lists which), so providers.base.network_outcome reads it as it reads httpx's. No
    cookie jar: nothing is added to what the adapter built but the default User-Agent, Accept and
    Accept-Encoding headers it lacks.
    """

    def __init__(self, timeout: float = 60.0) -> None:  # connections are bounded by the request slots
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))  # the cap Adapter.timeouts reads
        self._default_timeout = self.timeout.as_dict()
        self._connections = http1.Connections()

    async def send(self, request: httpx.Request, *, auth: Any = None) -> httpx.Response:
        if not isinstance(auth, httpx.Auth):  # None or httpx.USE_CLIENT_DEFAULT: the request as built
            return await self._one(request)
        flow = auth.async_auth_flow(request)
        history: list[httpx.Response] = []
        try:
            request = await flow.__anext__()
            while True:
                response = await self._one(request)
                response.history = list(history)
                try:
                    request = await flow.asend(response)
                except StopAsyncIteration:
                    return response
                history.append(response)
        finally:
            await flow.aclose()

    async def _one(self, request: httpx.Request) -> httpx.Response:
        answer = await self._connections.send(request, request.extensions.get("timeout") or self._default_timeout)
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if answer.reason:
            extensions["reason_phrase"] = answer.reason
        response = httpx.Response(answer.status, headers=answer.headers, stream=httpx.ByteStream(answer.body),
                                  request=request, extensions=extensions)
        response.read()  # decodes a Content-Encoding as httpx would
        return response

    def warm_up(self) -> None:
        self._connections.tls()

    async def aclose(self) -> None:
        await self._connections.aclose()


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


class _Turn:
    """A task's place in its account's line for room (LoopThread.room): first come, first served."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (a dependency on Linux and macOS): its timers, socket
    reads and writes and callbacks are C, and a worker sends 10-30 % more per second against an
    instant provider on it (docs/throughput.md); asyncio's with DISPATCHER_EVENT_LOOP=asyncio."""
    choice = os.environ.get("DISPATCHER_EVENT_LOOP", "uvloop")
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on this platform: asyncio's own
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    if choice != "asyncio":
        raise ValueError(f"DISPATCHER_EVENT_LOOP: {choice!r} is neither 'uvloop' nor 'asyncio'")
    return asyncio.new_event_loop()


class LoopThread:
    """An asyncio loop in a daemon thread; `run(coro)` executes on it from any thread."""

    def __init__(self, in_flight: int = 256, claim_ahead: int = 0) -> None:
        self.in_flight = in_flight  # requests in flight per account (request_slot)
        self.claim_cap = in_flight + claim_ahead  # messages held per account, claimed or sending (room)
        self._requests: dict[str, asyncio.Semaphore] = {}
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dispatcher-loop", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient | None = None
        self._wire: Wire | None = None
        self.warm = False  # its client and Wire are made (warm_up)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # signalled when an account's requests finish
        self._busy: Counter[str] = Counter()  # requests in flight per provider account
        self._needs: dict[str, list[_Turn]] = {}  # per account: the tasks waiting for room, in arrival order
        self._background: set[concurrent.futures.Future] = set()
        self.stopping = threading.Event()  # set at shutdown: sends not yet started are handed back
        self._closers: list[Callable[[], Coroutine[Any, Any, Any]]] = []  # run on the loop at close()

    def run(self, factory: Callable[[], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """Run the coroutine `factory()` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout)

    def client(self) -> httpx.AsyncClient:
        """The shared client; call only from coroutines running on this loop."""
        if self._client is None:
            self._client = make_client(self.in_flight)
        return self._client

    def wire(self) -> Wire:
        """The sends' Wire; call only from coroutines running on this loop."""
        if self._wire is None:
            self._wire = Wire()
        return self._wire

    def request_slot(self, account: str) -> asyncio.Semaphore:
        """The account's cap of requests in flight in this process; use only on this loop."""
        slot = self._requests.get(account)
        if slot is None:
            slot = self._requests[account] = asyncio.Semaphore(self.in_flight)
        return slot

    def submit(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> concurrent.futures.Future:
        """Start `factory()` on the loop and return at once; close() waits for it."""
        future = asyncio.run_coroutine_threadsafe(factory(), self._loop)
        with self._lock:
            self._background.add(future)
        future.add_done_callback(self._forget)
        return future

    def at_close(self, factory: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run `factory()` on the loop when it closes (what other modules opened on it)."""
        self._closers.append(factory)

    def _forget(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._background.discard(future)

    def room(self, wanted: dict[str, int], timeout: float) -> "Room":
        """Take room for messages to claim, per account, waiting at most `timeout` s in all for
        each account to have room for its whole want (or its whole share, if it wants more);
        each account gets what is free then. Tasks waiting for an account's room are served in
        the order they came: served as room happened to fit, some waited past their timeout and
        handed part of their batch back to the broker (65 tasks ran for 50 at 200 ms, and 8-20 %
        fewer messages a second; docs/throughput.md, "Fifth round"). Use it as a context
        manager: what it still holds is given back on exit, whatever happens."""
        deadline = time.monotonic() + timeout
        room = Room(self)
        try:
            for account, n in wanted.items():
                with self._lock:
                    need = min(n, self.claim_cap)
                    needs = self._needs.setdefault(account, [])
                    if needs or self.claim_cap - self._busy[account] < need:
                        turn = _Turn(need)
                        needs.append(turn)
                        try:
                            self._room.wait_for(lambda: needs[0] is turn and self.claim_cap - self._busy[account] >= need,
                                                max(deadline - time.monotonic(), 0.0))
                        finally:
                            needs.remove(turn)
                    granted = max(0, min(n, self.claim_cap - self._busy[account]))
                    self._busy[account] += granted
                    self._wake_next(account)  # the next in line may fit too
                room.held[account] += granted
        except BaseException:
            room.close()
            raise
        return room

    def _give_back(self, account: str, count: int) -> None:
        """Room comes back (often one message at a time): the waiting tasks are woken only once
        one of them can go, not at every message (every task thread woken 200 times a batch)."""
        with self._lock:
            self._busy[account] -= count
            self._wake_next(account)

    def _wake_next(self, account: str) -> None:
        """Wake the tasks waiting for the account's room if the first in line fits (lock held)."""
        needs = self._needs.get(account)
        if needs and self.claim_cap - self._busy[account] >= needs[0].need:
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
            if self._wire is not None:
                await self._wire.aclose()
            for closer in self._closers:
                try:
                    await closer()
                except Exception:  # noqa: BLE001 - closing on the way out; nothing to save
                    pass

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
            loop = LoopThread(in_flight, claim_ahead=in_flight)
            _loops[pid] = loop
    return loop


def close_process_loop() -> None:
    with _guard:
        loop = _loops.pop(os.getpid(), None)
    if loop is not None:
        loop.close()


def warm_up(in_flight: int = 256) -> None:
    """Create the loop, its client and its Wire now (TLS contexts, aiohttp session): not in a timed send.
    Once done, a call costs nothing: no trip to the loop (dispatch_batch calls it for every batch)."""
    loop = process_loop(in_flight)
    if loop.warm:
        return

    async def touch() -> None:
        loop.client()
        loop.wire().warm_up()

    loop.run(touch)
    loop.warm = True


def run(factory: Callable[[], Coroutine[Any, Any, Any]], in_flight: int = 256) -> Any:
    return process_loop(in_flight).run(factory)
