"""Pieces every sandbox twin shares: its settings, a fixed-window rate counter, JSON replies.

A twin (one module per provider kind) is an aiohttp sub-application built by
`make_app(settings: KindSettings) -> web.Application`. It implements only what the provider
documents: authentication, validation, replies, rate-limit headers, delivery states. Request
logging, latency and failure injection are applied around it by `server.py`, never inside.
A twin never imports `dispatcher.providers`.

A twin keeps what it stores (messages, rate counters, tokens) in one object with a `reset()`
method, placed at `app[STATE_KEY]`, so that `POST /_sandbox/reset` can empty it.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

# Where a twin keeps its resettable state object (anything with a `reset()` method).
STATE_KEY: web.AppKey[Any] = web.AppKey("sandbox_state", object)


def request_key(name: str, kind: type) -> Any:
    """A typed request-storage key (web.RequestKey on aiohttp >= 3.13, a plain string before)."""
    maker = getattr(web, "RequestKey", None)
    return maker(name, kind) if maker is not None else f"sandbox.{name}"


# Where the server's middleware leaves the body it already parsed, so twins do not parse twice.
PARSED_BODY_KEY = request_key("parsed_body", tuple)

_ID_ALPHABET = string.ascii_letters + string.digits
_IDS = random.Random()  # ids need to be unique and random-looking, not secret: this is ~50x cheaper


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

    def hit(self, key: str, limit: int, window: float, now: float | None = None) -> tuple[bool, int, float]:
        """Count one request. Returns (allowed, remaining, reset_at epoch seconds).

        `now` overrides the counter's own clock (twins pass `settings.clock()` read per request).
        """
        now = self.clock() if now is None else now
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
    cached = request.get(PARSED_BODY_KEY)
    if cached is not None:
        return cached
    raw = await request.read()
    return parse_json_body(raw)


def parse_json_body(raw: bytes) -> tuple[Any, str | None]:
    """(value, None) for a JSON body, (None, reason) otherwise."""
    if not raw:
        return None, "empty body"
    try:
        return json.loads(raw), None
    except ValueError as exc:
        return None, f"body is not JSON: {exc}"


def seconds_until(moment: float, now: float) -> int:
    """Whole seconds from `now` until `moment`, rounded up, never negative."""
    return max(0, math.ceil(moment - now))


def random_id(length: int = 20) -> str:
    """A random id of letters and digits, like Firestore document ids."""
    return "".join(_IDS.choices(_ID_ALPHABET, k=length))


def random_hex(length: int = 16) -> str:
    """A random id of `length` lowercase hex digits."""
    return f"{_IDS.getrandbits(4 * length):0{length}x}"


def random_uuid() -> str:
    """A random (version 4 shaped) UUID string."""
    h = random_hex(32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:]}"


def utc_iso(epoch: float, *, millis: bool = True) -> str:
    """`2024-11-10T02:48:08.004Z` (or without milliseconds) from epoch seconds."""
    dt = datetime.fromtimestamp(epoch, tz=timezone.utc)
    if millis:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def state_of(app: web.Application) -> Any:
    """The twin's resettable state object, wherever the twin keeps it (STATE_KEY or "state")."""
    state = app.get(STATE_KEY)
    if state is None:
        state = app.get("state")  # type: ignore[call-overload]
    return state
