"""Serving the HTTP API: `dispatcher api` in the foreground, or `ApiThread` in a test's process."""

from __future__ import annotations

import asyncio
from typing import Callable

from .. import runtime
from ..appserver import AppThread, serve_until_signal
from ..store.db import ensure_schema
from .app import build_app

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8781
BACKLOG = 1024  # 64 clients connecting at once must not be refused


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, out: Callable[[str], None] = print) -> None:
    """Serve the API until Ctrl-C or SIGTERM (the store's schema is checked first)."""
    ensure_schema(runtime.settings().database_url)

    def started(bound: int) -> None:
        settle_heap()
        out(f"HTTP API on http://{host}:{bound}  (Ctrl-C to stop; keys: dispatcher api-key create NAME)")

    asyncio.run(serve_until_signal(build_app(), host, port, started, backlog=BACKLOG))


def settle_heap() -> None:
    """Import what the first send would, then take every object alive now out of the garbage
    collector's view (gc.freeze). A full collection then scans only what requests created:
    under load it paused the server 76-89 ms of CPU before, 6-7 ms after (bench/api.py's tail)."""
    import gc

    from .. import celery_app, queue  # noqa: F401  (the broker client: otherwise the first send imports it)

    gc.collect()
    gc.freeze()


class ApiThread(AppThread):
    """The API on its own event loop in a daemon thread (tests, benchmarks)."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0) -> None:
        super().__init__(build_app, host, port, name="dispatcher-api", backlog=BACKLOG)
