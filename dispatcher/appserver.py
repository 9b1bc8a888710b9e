"""Serving an aiohttp app: in the foreground until a signal, or on its own loop in a thread.

The sandbox (`dispatcher sandbox`) and the webhook receiver (`dispatcher webhooks`) are both
small aiohttp apps run these two ways: by their command in the foreground, and by tests and
the demo in a daemon thread of the calling process (`AppThread`). Port 0 picks a free port;
the bound one is read back.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any, Callable

from aiohttp import web


async def start(app: web.Application, host: str, port: int, backlog: int = 128) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (no access log: URLs may carry tokens). Returns (runner, bound port)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=backlog, reuse_address=True)
    await site.start()
    return runner, runner.addresses[0][1]


async def serve_until_signal(app: web.Application, host: str, port: int,
                             started: Callable[[int], None], backlog: int = 128) -> None:
    """Serve until SIGINT or SIGTERM; `started(bound_port)` runs once the socket listens."""
    runner, bound = await start(app, host, port, backlog)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
            pass
    started(bound)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class AppThread:
    """An app built by `make_app()` served on its own event loop in a daemon thread.

    `start()` returns once the socket listens (or raises what went wrong); `call(fn)` runs
    `fn()` on the server's loop from any thread and returns its result.
    """

    def __init__(self, make_app: Callable[[], web.Application], host: str = "127.0.0.1", port: int = 0,
                 name: str = "dispatcher-app", backlog: int = 128) -> None:
        self.host, self.port = host, port
        self.app: web.Application | None = None
        self._make_app, self._name, self._backlog = make_app, name, backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Any:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name=self._name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError(f"{self._name} did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"{self._name} failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is None or self._stop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the server's loop and return its result (or raise its error)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError(f"{self._name} is not running")

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=30)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            self.app = self._make_app()
            runner, self.port = await start(self.app, self.host, self.port, self._backlog)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
