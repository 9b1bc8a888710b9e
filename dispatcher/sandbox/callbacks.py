"""Delivery reports the twins push: a scheduler on the sandbox server's loop, and its log.

A twin that has something to report asks the shared `CallbackScheduler` (found at
`request.config_dict[CALLBACKS_KEY]`; absent when a twin runs alone) to run a builder when an
event's time comes by the twin's own clock: `schedule(kind, due, clock, build)`. At that
moment `build(now)` returns the request to send (`Outgoing`: method, URL, exact body bytes,
headers, already signed) or None when there is nothing left to report (the state changed).
The scheduler sends it with a short timeout and retries a non-2xx answer or a network error
a couple of times, a moment apart. Per kind, `extra` may set `callback_timeout` (seconds per
attempt, default 2), `callback_retries` (default 2) and `callback_delay` (seconds between an
event and its report, default 0: a real provider's reporting lag). With the kind's `replay_callbacks` fault on, the same
request is sent once more afterwards, as a provider's duplicate delivery would be.

Every outgoing report is recorded (`CallbackRecord`, served at `GET /_sandbox/callbacks`)
with each attempt's answer, so tests see what was sent and what the receiver said. The log
never holds a secret: a `token` query parameter and a Bearer credential are shown as `***`.
`reset()` cancels every pending report and empties the log.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web

log = logging.getLogger("dispatcher.sandbox.callbacks")
DEFAULT_TIMEOUT = 2.0  # seconds per attempt
DEFAULT_RETRIES = 2  # attempts after the first one
RETRY_PAUSE = 0.2  # seconds before the first retry, doubled for each next one
MAX_NAP = 0.25  # a pending report re-reads the twin's clock at least this often (injected clocks)
_MAX_LOG = 20_000
_SECRET_PARAMS = {"token", "secret", "key", "api_key", "signature"}


@dataclass(frozen=True)
class Outgoing:
    """One delivery report, ready to send: exact body bytes, headers already signed."""

    method: str
    url: str
    body: bytes
    headers: dict[str, str]


@dataclass
class CallbackAttempt:
    at: float  # epoch seconds when the answer (or the error) came
    status: int | None  # the receiver's HTTP status; None for a network error or timeout
    response: Any = None  # the answer's JSON body, when it had one
    error: str | None = None  # what went wrong at the network level


@dataclass
class CallbackRecord:
    """One report a twin sent (or is sending), and every answer it got."""

    seq: int
    kind: str
    method: str
    url: str  # secrets masked
    headers: dict[str, str]  # secrets masked
    body: bytes
    json: Any
    due_at: float  # when the event happened, by the twin's clock
    replay: bool = False  # a deliberate duplicate (the replay_callbacks fault)
    attempts: list[CallbackAttempt] = field(default_factory=list)
    done: bool = False  # no attempt is left to make

    @property
    def status(self) -> int | None:
        """The last answer's HTTP status (None: no answer yet, or a network error)."""
        return self.attempts[-1].status if self.attempts else None

    @property
    def response(self) -> Any:
        return self.attempts[-1].response if self.attempts else None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["body"] = self.body.decode("utf-8", errors="replace")
        data["attempts"] = [vars(a) for a in self.attempts]
        data.update(status=self.status, response=self.response, delivered=self.delivered)
        return data


class CallbackScheduler:
    """Sends the twins' delivery reports when their time comes; one per sandbox server."""

    def __init__(self, replays: Callable[[str], bool] = lambda kind: False) -> None:
        self.replays = replays  # kind -> whether each report is sent twice
        self.log: list[CallbackRecord] = []
        self.seq = 0
        self._tasks: set[asyncio.Task] = set()
        self._session: aiohttp.ClientSession | None = None

    # ---- what the twins call
    def schedule(self, kind: str, due: float, clock: Callable[[], float],
                 build: Callable[[float], Outgoing | None], *, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, delay: float = 0.0) -> None:
        """Run `build` once `clock()` reaches `due` (+ `delay`), and send what it returns. Call on the loop."""
        task = asyncio.get_running_loop().create_task(
            self._run(kind, due, due + max(0.0, delay), clock, build, timeout, retries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- what tests and the control API read
    def records(self, kind: str | None = None, since: int = 0) -> list[CallbackRecord]:
        """Snapshots of the reports with seq > `since` (of one kind), oldest first."""
        return [copy.deepcopy(r) for r in self.log if r.seq > since and (kind is None or r.kind == kind)]

    @property
    def pending(self) -> int:
        """Reports not yet due or still being sent."""
        return len(self._tasks)

    def reset(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        self.log.clear()

    async def close(self, app: web.Application | None = None) -> None:
        """Cancel what is pending and close the HTTP session (an aiohttp on_cleanup hook)."""
        tasks = list(self._tasks)
        self.reset()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the work
    async def _run(self, kind: str, due: float, send_at: float, clock: Callable[[], float],
                   build: Callable[[float], Outgoing | None], timeout: float, retries: int) -> None:
        while (wait := send_at - clock()) > 0:
            await asyncio.sleep(min(wait, MAX_NAP))
        outgoing = build(max(clock(), due))
        if outgoing is None:
            return
        await self._deliver(self._record(kind, outgoing, due, replay=False), outgoing, timeout, retries)
        if self.replays(kind):
            await self._deliver(self._record(kind, outgoing, due, replay=True), outgoing, timeout, retries)

    def _record(self, kind: str, outgoing: Outgoing, due: float, replay: bool) -> CallbackRecord:
        self.seq += 1
        try:
            parsed = json.loads(outgoing.body)
        except ValueError:
            parsed = None
        record = CallbackRecord(self.seq, kind, outgoing.method, masked_url(outgoing.url),
                                masked_headers(outgoing.headers), outgoing.body, parsed, due, replay)
        self.log.append(record)
        if len(self.log) > _MAX_LOG:
            del self.log[: _MAX_LOG // 10]
        return record

    async def _deliver(self, record: CallbackRecord, outgoing: Outgoing, timeout: float, retries: int) -> None:
        try:
            for attempt in range(retries + 1):
                if attempt:
                    await asyncio.sleep(RETRY_PAUSE * 2 ** (attempt - 1))
                record.attempts.append(await self._attempt(outgoing, timeout))
                if record.delivered:
                    return
            log.info("%s report to %s not taken after %d attempts (last status %s)",
                     record.kind, record.url, retries + 1, record.status)
        finally:
            record.done = True

    async def _attempt(self, outgoing: Outgoing, timeout: float) -> CallbackAttempt:
        if self._session is None:  # a fresh connection per report: no stale keep-alive to trip on
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        try:
            async with self._session.request(outgoing.method, outgoing.url, data=outgoing.body,
                                             headers=outgoing.headers,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                raw = await response.read()
                return CallbackAttempt(time.time(), response.status, _json_or_none(raw))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return CallbackAttempt(time.time(), None, error=type(exc).__name__)


def masked_url(url: str) -> str:
    """The URL with the values of secret-looking query parameters (token, key, ...) as ***."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def masked_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers with an Authorization credential shown as `<scheme> ***`."""
    shown = dict(headers)
    for name in list(shown):
        if name.lower() == "authorization":
            scheme = shown[name].partition(" ")[0]
            shown[name] = f"{scheme} ***"
    return shown


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


# Where the sandbox server keeps its scheduler; twins find it through `request.config_dict`.
CALLBACKS_KEY: web.AppKey[CallbackScheduler] = web.AppKey("sandbox_callbacks", CallbackScheduler)


def scheduler_of(request: web.Request) -> CallbackScheduler | None:
    """The sandbox's scheduler, or None when the twin runs alone (no reports are sent)."""
    return request.config_dict.get(CALLBACKS_KEY)


def json_body(data: Any) -> bytes:
    """Compact JSON bytes, as the twins send them (and sign them)."""
    return json.dumps(data, separators=(",", ":")).encode()


def report_settings(extra: dict[str, Any]) -> dict[str, Any]:
    """`schedule()` keywords from a kind's `extra`: callback_timeout, callback_retries, callback_delay."""
    return {"timeout": float(extra.get("callback_timeout", DEFAULT_TIMEOUT)),
            "retries": int(extra.get("callback_retries", DEFAULT_RETRIES)),
            "delay": float(extra.get("callback_delay", 0.0))}
