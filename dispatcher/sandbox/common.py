"""Pieces every sandbox twin shares: its settings, a fixed-window rate counter, JSON replies.

A twin (one module per provider kind) is an aiohttp sub-application built by
`make_app(settings: KindSettings) -> web.Application`. It implements only what the provider
documents: authentication, validation, replies, rate-limit headers, delivery states. Request
logging, latency and failure injection are applied around it by `server.py`, never inside.
A twin never imports `dispatcher.providers`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web


@dataclass
class KindSettings:
    """How one twin behaves. Tests and `dispatcher sandbox` may change these at run time."""

    credentials: dict[str, str]  # the only credentials the twin accepts
    rate_limit: int | None = None  # requests per window per credential; None = unlimited
    rate_window: float = 60.0  # seconds
    delivery_step: float = 0.5  # seconds between delivery states (where the kind has them)
    clock: Callable[[], float] = time.time  # wall clock, injectable
    extra: dict[str, Any] = field(default_factory=dict)  # per-kind switches


class FixedWindow:
    """Counts requests per key in fixed windows aligned to the epoch: the provider's view of a limit."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}

    def hit(self, key: str, limit: int, window: float) -> tuple[bool, int, float]:
        """Count one request. Returns (allowed, remaining, reset_at epoch seconds)."""
        now = self.clock()
        start = now - (now % window)
        w_start, count = self._windows.get(key, (start, 0))
        if w_start != start:
            w_start, count = start, 0
        reset_at = w_start + window
        if count >= limit:
            return False, 0, reset_at
        count += 1
        self._windows[key] = (w_start, count)
        return True, limit - count, reset_at

    def reset(self) -> None:
        self._windows.clear()


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers=headers, content_type="application/json"
    )


async def read_json(request: web.Request) -> tuple[Any, str | None]:
    """The request body parsed as JSON, or (None, reason) when it is not JSON."""
    raw = await request.read()
    if not raw:
        return None, "empty body"
    try:
        return json.loads(raw), None
    except ValueError as exc:
        return None, f"body is not JSON: {exc}"
