"""Test helpers for running one sandbox twin alone on 127.0.0.1 with a fixed clock."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import web


class FixedClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TwinServer:
    """One twin application served on 127.0.0.1 from a thread of its own."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app, access_log=None)
        self.url = ""

    def __enter__(self) -> "TwinServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def fixed_clock_on(sandbox, kind: str, now: float) -> FixedClock:  # type: ignore[no-untyped-def]
    """Give the `kind` twin of a running sandbox a clock that stands still at `now` until moved."""
    clock = FixedClock(now)
    sandbox.settings(kind).clock = clock
    return clock
